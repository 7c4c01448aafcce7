#!/usr/bin/env bash
# The asynchronous CUDA backend's figures (issue #10), on a GPU machine with
# no Rust toolchain, from the prebuilt binaries in .devbin/ (made on the build
# machine by scripts/build-devbin.sh, which builds cuda_test, cuda_throughput,
# beast and beast-bench with --features cuda). Finishes in about 3 minutes
# (each step has its own timeout). Everything goes to stdout; the figures are
# the three RESULT lines at the end:
#
#   RESULT batch1_server_us p50 <us> p99 <us> client_p50_ms <ms>
#       a lone bench_ens request on an idle server (one shard on core 0,
#       cache off, 200 req/s from 1 connection): the server's own time
#       (queue + compute, beast-bench's "server total"), and the client's p50;
#   RESULT batch1024 cuda_split_rows_per_s <f> cuda_half_rows_per_s <f> gemm_only_rows_per_s <f> half_share <f> split_share <f> (target share >= 0.80)
#       bench_ens at batch 1024 through the backend's registered path (two
#       rounds in flight) against cuBLAS FP16 GEMMs alone on the same shapes
#       in the same run (examples/cuda_throughput.rs);
#   RESULT p99_under_2ms highest_rate <req/s> p99_ms <ms> next_rate <req/s> next_p99_ms <ms>
#       one shard (core 0, cache off, bench models at max_batch 512) driven by
#       beast-bench on cores 2-5, 64 connections x 32 in flight, open loop,
#       3 s per rate after 1 s warm-up: the highest offered rate of the sweep
#       whose corrected p99 is under 2 ms (and the first one above it).
#
#   bash perf/cuda_async_check.sh [devbin-dir]
set -uo pipefail
cd "$(dirname "$0")/.."
bin=${1:-.devbin}
RATES=${RATES:-50000,100000,150000,200000,250000,300000,400000}
# Cores of the load generator (the server is on core 0).
BENCH_CORES=${BENCH_CORES:-2-7}
BENCH_THREADS=${BENCH_THREADS:-2,3,4,5}
echo "== commit: $(cat "$bin/COMMIT" 2>/dev/null || echo unknown); $(nproc) CPUs"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
export LD_LIBRARY_PATH=/usr/local/nvidia/lib64:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
pyn=$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])' 2>/dev/null || true)
[ -n "$pyn" ] && for d in "$pyn"/*/lib; do [ -d "$d" ] && LD_LIBRARY_PATH="$d:$LD_LIBRARY_PATH"; done
for f in cuda_throughput beast beast-bench; do
  [ -x "$bin/$f" ] || { echo "missing $bin/$f (run scripts/build-devbin.sh on the build machine)"; exit 1; }
done

echo "== kernel throughput (cuda_throughput --secs 1.5 --batches 1,32,1024 --no-cpu)"
tp=$(timeout 90 "$bin/cuda_throughput" --secs 1.5 --batches 1,32,1024 --no-cpu 2>&1)
echo "$tp"
split_rps=$(echo "$tp" | awk '$1 == "backend" && $2 == "cuda" && $4 == 1024 {print $6}')
half_rps=$(echo "$tp" | awk '$1 == "backend" && $2 == "cuda-half" && $4 == 1024 {print $6}')
gemm=$(echo "$tp" | awk '$1 == "gemm_only" && $3 == 1024 {print $5, $7, $9}')

work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$work"' EXIT
"$bin/beast" demo-models --out "$work/models" > /dev/null 2>&1
for m in bench_a bench_b bench_c; do
  sed -i 's/^max_batch = .*/max_batch = 512/; s/^queue_rows_max = .*/queue_rows_max = 16384/' "$work/models/$m/model.toml"
  grep -q '^\[batching\]' "$work/models/$m/model.toml" || printf '\n[batching]\nmax_batch = 512\nqueue_rows_max = 16384\n' >> "$work/models/$m/model.toml"
done
printf '[cache]\nenabled = false\n' > "$work/beast.toml"
BEAST_BACKEND=cuda taskset -c 0 "$bin/beast" serve --models "$work/models" --cores 0 --listen 127.0.0.1:7901 \
  --admin-listen off --config "$work/beast.toml" > "$work/serve.log" 2>&1 &
for _ in $(seq 100); do grep -q listening "$work/serve.log" && break; sleep 0.2; done
echo "== server"; cat "$work/serve.log"
col() { # csv header-named column of the last data row
  awk -F, -v c="$1" 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == c) k = i; next } { v = $k } END { print v }'
}
echo "== batch-1 server time: 200 req/s, 1 connection x 4 in flight, 5 s"
one=$(timeout 30 taskset -c "$BENCH_CORES" "$bin/beast-bench" --server 127.0.0.1:7901 --target bench_ens --no-cache \
  --rate 200 -c 1 -k 4 --duration 5 --warmup 1 --cpus "${BENCH_THREADS%%,*}" --csv --max-error-fraction 1 2>&1)
echo "$one"
b1_p50=$(echo "$one" | grep -E '^(label|[^,]*,open)' | col server_total_p50_us)
b1_p99=$(echo "$one" | grep -E '^(label|[^,]*,open)' | col server_total_p99_us)
b1_c50=$(echo "$one" | grep -E '^(label|[^,]*,open)' | col p50_ms)

echo "== sweep $RATES: 64 connections x 32 in flight, 3 s per rate"
sw=$(timeout 120 taskset -c "$BENCH_CORES" "$bin/beast-bench" --server 127.0.0.1:7901 --target bench_ens --no-cache \
  --sweep "$RATES" -c 64 -k 32 --duration 3 --warmup 1 --cpus "$BENCH_THREADS" --csv --max-error-fraction 1 2>&1)
echo "$sw"
best=$(echo "$sw" | grep -E '^(label|[^,]*,open)' | awk -F, '
  NR == 1 { for (i = 1; i <= NF; i++) { if ($i == "offered_rps") o = i; if ($i == "p99_ms") p = i; if ($i == "unsent") u = i }; next }
  { if ($p + 0 < 2.0 && $u + 0 == 0 && !over) { rate = $o; p99 = $p } else if (!over) { over = 1; nrate = $o; np99 = $p } }
  END { printf "highest_rate %s p99_ms %s next_rate %s next_p99_ms %s\n", rate ? rate : "none", p99 ? p99 : "-", nrate ? nrate : "-", np99 ? np99 : "-" }')
kill -TERM %1 2>/dev/null; wait 2>/dev/null
echo "== server log tail"; tail -3 "$work/serve.log"

echo
echo "RESULT batch1_server_us p50 ${b1_p50:-?} p99 ${b1_p99:-?} client_p50_ms ${b1_c50:-?}"
read -r g_rps g_half g_split <<< "${gemm:-? ? ?}"
echo "RESULT batch1024 cuda_split_rows_per_s ${split_rps:-?} cuda_half_rows_per_s ${half_rps:-?} gemm_only_rows_per_s ${g_rps:-?} half_share ${g_half:-?} split_share ${g_split:-?} (target share >= 0.80)"
echo "RESULT p99_under_2ms $best"
