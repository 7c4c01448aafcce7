#!/usr/bin/env bash
# The whole server against its own kernel, in one run, on this machine:
#   1. the CPU backend alone on bench_ens at the batch sizes the batcher forms
#      (examples/backend_throughput, pinned to core 0);
#   2. `beast serve --cores 0` (cache off) saturated by beast-bench on core 1
#      in closed loop, 32 connections x 16 in flight, batch-1 requests:
#      rows/s through the server, and the mean batch it formed;
#   3. open loop: the highest offered rate whose corrected p95 stays under
#      50 ms (beast-bench --search), and the p99 there.
# Prints a markdown section for perf/server.md.
#   perf/server_vs_kernel.sh          (NO_BUILD=1 to skip the build, SECS=N per point)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${SECS:-5}
[ -n "${NO_BUILD:-}" ] || cargo build --release --bin beast --bin beast-bench --example backend_throughput >&2
work=$(mktemp -d /tmp/beast-svk.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$work"' EXIT
target/release/beast demo-models --out "$work/models" 2>/dev/null
printf '[cache]\nenabled = false\n' > "$work/beast.toml"

echo "## Server vs kernel, $(date -u +%F), commit $(git rev-parse --short HEAD)"
echo
echo "- machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs; load average at start $(cut -d' ' -f1-3 /proc/loadavg)"
echo "- command: \`perf/server_vs_kernel.sh\` (SECS=$SECS)"
echo
echo "Kernel alone (\`taskset -c 0 target/release/examples/backend_throughput --secs 6 --batches 1,8,32,64\`):"
echo
echo '```'
kernel=$(taskset -c 0 target/release/examples/backend_throughput --secs 6 --batches 1,8,32,64)
echo "$kernel"
echo '```'

taskset -c 0 target/release/beast serve --models "$work/models" --cores 0 --listen 127.0.0.1:7996 \
  --admin-listen 127.0.0.1:7997 --config "$work/beast.toml" 2> "$work/serve.log" &
for _ in $(seq 100); do grep -q listening "$work/serve.log" && break; sleep 0.1; done
bench() { taskset -c 1 target/release/beast-bench --server 127.0.0.1:7996 --admin 127.0.0.1:7997 --cpus 1 \
  --target bench_ens --no-cache -c 32 -k 16 --duration "$SECS" --warmup 1 "$@"; }

echo
echo "Saturation, closed loop (\`beast-bench --closed -c 32 -k 16 --no-cache --target bench_ens\`):"
echo
pid=$(pgrep -f "listen 127.0.0.1:7996" | head -n 1)
ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
echo '```'
t0=$(ticks)
sat=$(bench --closed --max-error-fraction 1)
t1=$(ticks)
echo "$sat"
echo '```'
achieved=$(echo "$sat" | awk '/achieved/ {print $2; exit}')
ok=$(echo "$sat" | sed -n 's/.*(\([0-9]*\) ok of.*/\1/p' | head -n 1)
# The server's own CPU seconds over the run (warm-up included: a slight under-estimate of its rate).
cpu_s=$(awk -v a="$t0" -v b="$t1" -v hz="$(getconf CLK_TCK)" 'BEGIN { print (b - a) / hz }')
warm_ok=$(awk -v ok="$ok" -v secs="$SECS" 'BEGIN { print ok * (secs + 1) / secs }')
srv_cpu_rate=$(awk -v n="$warm_ok" -v c="$cpu_s" 'BEGIN { printf "%.1f", n / c }')
batch=$(echo "$sat" | sed -n 's/.*mean batch size \([0-9.]*\).*/\1/p' | head -n 1)
# Kernel rows/s at the batch size nearest to the one the server formed.
kline=$(echo "$kernel" | awk -v b="${batch:-64}" '$1 == "batch" { d = ($2 > b) ? $2 - b : b - $2; if (best == "" || d < bestd) { best = $0; bestd = d } } END { print best }')
krows=$(echo "$kline" | awk '{print $4}')
kcpu=$(echo "$kline" | awk '{print $8}')
echo
echo "| | rows/s (wall) | rows per CPU-second |"
echo "|---|---:|---:|"
echo "| kernel alone, batch $(echo "$kline" | awk '{print $2}') | $krows | $kcpu |"
echo "| through the server, mean batch ${batch:-?} | $achieved | $srv_cpu_rate (server used $cpu_s CPU-s) |"
echo "| **server / kernel** | $(awk -v a="$achieved" -v k="$krows" 'BEGIN { printf "%.2f", a / k }') | **$(awk -v a="$srv_cpu_rate" -v k="$kcpu" 'BEGIN { printf "%.2f", a / k }')** |"
echo
echo "The CPU-second column is the one to read on a shared machine: a neighbour"
echo "process on core 0 takes wall time from the server but not CPU time."
echo
echo "Open loop, highest rate with corrected p95 under 50 ms (\`beast-bench --search 5000:60000 --slo-p95-ms 50\`):"
echo
echo '```'
bench --search 5000:60000 --slo-p95-ms 50 --search-steps 6 --max-error-fraction 0.001 2>&1 | grep -E "^search|offered|achieved|corrected|GENERATOR|unsent" || true
echo '```'
kill -TERM %1 2>/dev/null; wait 2>/dev/null || true
