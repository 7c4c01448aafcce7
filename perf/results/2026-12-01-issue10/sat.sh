#!/usr/bin/env bash
# Rows 3-4 again, tighter: per round and per binary, kernel alone at batch 64 right before the
# saturated server, so both see the same machine speed. Rounds alternate base/new.
set -uo pipefail
cd /work/main
BASE=/work/wt/base/target/release/beast
NEW=$PWD/target/release/beast
BENCH=$PWD/target/release/beast-bench
ROUNDS=${ROUNDS:-3}; SECS=${SECS:-3}
W=$(mktemp -d /tmp/issue10s.XXXXXX)
$BASE demo-models --out $W/models >/dev/null 2>&1
printf '[cache]\nenabled = false\n' > $W/beast.toml
echo "sat run $(date -u +%FT%TZ); uptime: $(uptime)"
echo "cmds: taskset -c 0 examples/backend_throughput --secs 2 --batches 64; then beast-bench --closed -c 32 -k 16 --no-cache --target bench_ens --duration $SECS --warmup 1 against serve --cores 0 (cache off); server CPU from /proc/PID/stat"
echo "round label kernel_rows_per_cpu_s ok server_cpu_ticks(warm-up incl) mean_batch"
for r in $(seq $ROUNDS); do
 for b in base:$BASE new:$NEW; do
  l=${b%%:*}; bin=${b#*:}
  k=$(taskset -c 0 $(dirname $bin)/examples/backend_throughput --secs 2 --batches 64 | awk '$1=="batch"{print $8}')
  taskset -c 0 $bin serve --models $W/models --cores 0 --listen 127.0.0.1:7996 --admin-listen 127.0.0.1:7997 --config $W/beast.toml > $W/serve.log 2>&1 & SP=$!
  for _ in $(seq 100); do grep -q listening $W/serve.log && break; sleep 0.1; done; sleep 0.3
  t0=$(awk '{print $14+$15}' /proc/$SP/stat)
  out=$(taskset -c 1 $BENCH --server 127.0.0.1:7996 --admin 127.0.0.1:7997 --cpus 1 --target bench_ens --no-cache -c 32 -k 16 --closed --duration $SECS --warmup 1 --max-error-fraction 1)
  t1=$(awk '{print $14+$15}' /proc/$SP/stat)
  kill -TERM $SP; wait $SP 2>/dev/null
  ok=$(echo "$out" | sed -n 's/.*(\([0-9]*\) ok of.*/\1/p' | head -1)
  mb=$(echo "$out" | sed -n 's/.*mean batch size \([0-9.]*\).*/\1/p' | head -1)
  echo "$r $l $k $ok $((t1-t0)) $mb loadavg $(cut -d' ' -f1 /proc/loadavg)"
 done
done
echo "end $(date -u +%FT%TZ); uptime: $(uptime)"
rm -rf $W
