#!/usr/bin/env bash
# The whole server on a GPU machine: `beast serve` with the CUDA backend on
# the bench models, driven by beast-bench (prebuilt binaries in .devbin/,
# made by scripts/build-devbin.sh). Prints the CPU backend's run beside it.
#   bash perf/cuda_server_check.sh [devbin-dir]
set -uo pipefail
cd "$(dirname "$0")/.."
bin=${1:-.devbin}
export LD_LIBRARY_PATH=/usr/local/nvidia/lib64:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
models=$(mktemp -d)
"$bin/beast" demo-models --out "$models"
cfg=$(mktemp)
printf '[cache]\nenabled = false\n[batch]\nmax_batch = 256\nmax_queue_delay_us = 500\nqueue_rows_max = 16384\n' > "$cfg"
echo "== $(nproc) CPUs; $(lscpu | grep 'Model name' | sed 's/ \+/ /g')"
for backend in cuda cpu; do
  # bench_ens models carry their own [batching] (max_batch 64): raise it for the GPU run.
  if [ $backend = cuda ]; then
    for m in bench_a bench_b bench_c; do
      sed -i 's/^max_batch = .*/max_batch = 512/; s/^queue_rows_max = .*/queue_rows_max = 16384/' "$models/$m/model.toml" 2>/dev/null
      grep -q '^\[batching\]' "$models/$m/model.toml" || printf '\n[batching]\nmax_batch = 512\nmax_queue_delay_us = 500\nqueue_rows_max = 16384\n' >> "$models/$m/model.toml"
    done
  fi
  BEAST_BACKEND=$backend taskset -c 0 "$bin/beast" serve --models "$models" --cores 0 --listen 127.0.0.1:7900 --config "$cfg" > /tmp/serve-$backend.log 2>&1 &
  pid=$!
  for i in $(seq 50); do grep -q listening /tmp/serve-$backend.log && break; sleep 0.2; done
  cat /tmp/serve-$backend.log
  for rate in 20000 50000 100000 150000; do
    echo "== backend $backend, offered $rate req/s, bench_ens, 64 conn x 32 in flight, cache off"
    timeout 60 taskset -c 2-7 "$bin/beast-bench" --server 127.0.0.1:7900 --target bench_ens --no-cache \
      --rate $rate -c 64 -k 32 --duration 5 --warmup 2 --cpus 2,3,4,5 --max-error-fraction 1
  done
  kill -TERM $pid; wait $pid; tail -1 /tmp/serve-$backend.log
  # Restore the CPU batching for the next backend.
  "$bin/beast" demo-models --out "$models" > /dev/null 2>&1
done
