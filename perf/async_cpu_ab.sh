#!/usr/bin/env bash
# The CPU batch path before and after a change, side by side: two builds of
# `beast` + `beast-bench` (folders A and B), each serving bench_ens on core 0
# (cache off) in turn, ROUNDS times alternating A/B, each round:
#   - closed loop, 32 connections x 16 in flight, batch-1 requests: req/s,
#     and the server's own CPU µs per answered request (utime+stime from
#     /proc over the run, warm-up included: robust to other load on the
#     machine, unlike the rate);
#   - open loop at a low rate (RATE req/s): corrected p50 / p99 in ms, and
#     the server's own p50 (queue + compute) in µs.
# Prints one line per run:
#   <label> round <n> closed_rps <f> cpu_us_per_req <f> low_p50_ms <f> low_p99_ms <f> server_p50_us <f>
#   perf/async_cpu_ab.sh DIR_A DIR_B   (SECS=3 ROUNDS=3 RATE=1000)
set -uo pipefail
cd "$(dirname "$0")/.."
A=$1; B=$2
SECS=${SECS:-3}; ROUNDS=${ROUNDS:-3}; RATE=${RATE:-1000}
work=$(mktemp -d /tmp/beast-ab.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$work"' EXIT
"$A/beast" demo-models --out "$work/models" 2>/dev/null
printf '[cache]\nenabled = false\n' > "$work/beast.toml"
echo "# $(date -u +%FT%TZ) $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg); A=$A B=$B SECS=$SECS RATE=$RATE"
one() { # label dir round
  local label=$1 dir=$2 round=$3
  taskset -c 0 "$dir/beast" serve --models "$work/models" --cores 0 --listen 127.0.0.1:7986 \
    --admin-listen off --config "$work/beast.toml" 2> "$work/serve.log" &
  local pid=$!
  for _ in $(seq 100); do grep -q listening "$work/serve.log" && break; sleep 0.1; done
  local bench=(taskset -c 1 "$dir/beast-bench" --server 127.0.0.1:7986 --cpus 1 --target bench_ens
    --no-cache --duration "$SECS" --warmup 1 --max-error-fraction 1)
  local closed low t0 t1
  ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
  t0=$(ticks)
  closed=$("${bench[@]}" --closed -c 32 -k 16 2>&1)
  t1=$(ticks)
  low=$("${bench[@]}" --rate "$RATE" -c 8 -k 16 2>&1)
  kill -TERM $pid; wait $pid 2>/dev/null
  local rps ok cpu p50 p99 sp50
  rps=$(echo "$closed" | awk '/achieved/ {print $2; exit}')
  ok=$(echo "$closed" | sed -n 's/.*(\([0-9]*\) ok of.*/\1/p' | head -n 1)
  cpu=$(awk -v a="$t0" -v b="$t1" -v hz="$(getconf CLK_TCK)" -v ok="${ok:-0}" -v s="$SECS" \
    'BEGIN { n = ok * (s + 1) / s; if (n > 0) printf "%.1f", (b - a) / hz * 1e6 / n; else print "?" }')
  p50=$(echo "$low" | awk '$1 == "corrected" {print $2; exit}')
  p99=$(echo "$low" | awk '$1 == "corrected" {print $5; exit}')
  sp50=$(echo "$low" | sed -n 's/.*server *total p50 \([0-9]*\) us.*/\1/p' | head -n 1)
  echo "$label round $round closed_rps ${rps:-?} cpu_us_per_req $cpu low_p50_ms ${p50:-?} low_p99_ms ${p99:-?} server_p50_us ${sp50:-?}"
  [ -n "${VERBOSE:-}" ] && { echo "$closed"; echo "$low"; }
}
for r in $(seq "$ROUNDS"); do
  one A "$A" "$r"
  one B "$B" "$r"
done
