#!/usr/bin/env bash
# Row 6: cache-hit path vs Redis GET (closed loop part of perf/hit_vs_redis.sh), base and new in turn.
set -uo pipefail
cd /work/main
BASE=/work/wt/base/target/release/beast
NEW=$PWD/target/release/beast
BENCH=$PWD/target/release/beast-bench
SECS=${SECS:-4}; CONNS=50
W=$(mktemp -d /tmp/issue10h.XXXXXX)
$BASE demo-models --out $W/models >/dev/null 2>&1
printf '[cache]\nl2_path = "%s"\n' "$W/l2.cache" > $W/beast.toml
echo "hit run $(date -u +%FT%TZ); uptime: $(uptime); redis $(redis-server --version)"
taskset -c 0 redis-server --port 6395 --save '' --appendonly no > $W/redis.log 2>&1 & RP=$!
for _ in $(seq 100); do redis-cli -p 6395 ping >/dev/null 2>&1 && break; sleep 0.1; done
for depth in 1 16; do
 for b in base:$BASE new:$NEW; do
  l=${b%%:*}; bin=${b#*:}
  rm -f $W/l2.cache
  taskset -c 0 $bin serve --models $W/models --cores 0 --listen 127.0.0.1:7995 --admin-listen off --config $W/beast.toml > $W/serve.log 2>&1 & SP=$!
  for _ in $(seq 100); do grep -q listening $W/serve.log && break; sleep 0.1; done; sleep 0.3
  echo "==== depth $depth beast $l loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "cmd: taskset -c 1 beast-bench --server 127.0.0.1:7995 --cpus 1 --target bench_a --distinct 64 -c $CONNS --duration $SECS --warmup 1 --closed -k $depth --max-error-fraction 0.001"
  taskset -c 1 $BENCH --server 127.0.0.1:7995 --cpus 1 --target bench_a --distinct 64 -c $CONNS --duration $SECS --warmup 1 --closed -k $depth --max-error-fraction 0.001
  kill -TERM $SP; wait $SP 2>/dev/null
  echo "==== depth $depth redis loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "cmd: taskset -c 1 redis-benchmark -p 6395 -c $CONNS -P $depth -t get -d 64 -n $((depth == 1 ? 300000 : 3000000)) --csv"
  taskset -c 1 redis-benchmark -p 6395 -c $CONNS -P $depth -t get -d 64 -n $((depth == 1 ? 300000 : 3000000)) --csv 2>/dev/null | tail -n 2
 done
done
kill $RP; wait $RP 2>/dev/null
echo "end $(date -u +%FT%TZ); uptime: $(uptime)"
rm -rf $W
