#!/usr/bin/env bash
# issue #10 table, base (8326b70) and new (main HEAD) alternated in one run.
# Server on core 0, beast-bench (the current build, for both) on core 1, cache off.
set -uo pipefail
cd /work/main
BASE=/work/wt/base/target/release/beast
NEW=$PWD/target/release/beast
BENCH=$PWD/target/release/beast-bench
SECS=${SECS:-4}
W=$(mktemp -d /tmp/issue10.XXXXXX)
$BASE demo-models --out $W/models >/dev/null 2>&1
printf '[cache]\nenabled = false\n' > $W/beast.toml
PORT=7996; ADMIN=7997
SP=
start() { taskset -c 0 $1 serve --models $W/models --cores 0 --listen 127.0.0.1:$PORT --admin-listen 127.0.0.1:$ADMIN --config $W/beast.toml > $W/serve.log 2>&1 &
  SP=$!; for _ in $(seq 100); do grep -q listening $W/serve.log && break; sleep 0.1; done; sleep 0.3; }
stop() { kill -TERM $SP; wait $SP 2>/dev/null; }
bench() { taskset -c 1 $BENCH --server 127.0.0.1:$PORT --admin 127.0.0.1:$ADMIN --cpus 1 --target bench_ens --no-cache "$@"; }
ticks() { awk '{print $14 + $15}' /proc/$SP/stat; }
echo "issue10 run $(date -u +%FT%TZ); uptime: $(uptime)"
echo "HEAD $(git rev-parse --short HEAD); base 8326b70; SECS=$SECS"
for b in base:$BASE new:$NEW; do l=${b%%:*}; echo "== kernel $l: taskset -c 0 $(dirname ${b#*:})/examples/backend_throughput --secs 3 --batches 1,8,16,32,64"; taskset -c 0 $(dirname ${b#*:})/examples/backend_throughput --secs 3 --batches 1,8,16,32,64; done
for row in lone sweep sat search; do
 for b in base:$BASE new:$NEW; do
  l=${b%%:*}; bin=${b#*:}
  echo; echo "==== $row $l ($bin) loadavg $(cut -d' ' -f1-3 /proc/loadavg) $(date -u +%T)"
  start $bin
  case $row in
   lone) echo "cmd: bench --closed -c 1 -k 1 --duration $SECS --warmup 1"; bench --closed -c 1 -k 1 --duration $SECS --warmup 1;;
   sweep) echo "cmd: bench -c 16 -k 64 --sweep 8000,16000 --duration $SECS --warmup 1 --max-error-fraction 1"; bench -c 16 -k 64 --sweep 8000,16000 --duration $SECS --warmup 1 --max-error-fraction 1;;
   sat) echo "cmd: bench --closed -c 32 -k 16 --duration $SECS --warmup 1 --max-error-fraction 1 (server CPU from /proc/PID/stat)"
        t0=$(ticks); bench --closed -c 32 -k 16 --duration $SECS --warmup 1 --max-error-fraction 1; t1=$(ticks)
        echo "server CPU ticks over run (warm-up incl.): $((t1-t0)) at $(getconf CLK_TCK)/s";;
   search) echo "cmd: bench -c 32 -k 16 --search 20000:60000 --slo-p95-ms 50 --search-steps 5 --duration 3 --warmup 1 --max-error-fraction 0.001"
        bench -c 32 -k 16 --search 20000:60000 --slo-p95-ms 50 --search-steps 5 --duration 3 --warmup 1 --max-error-fraction 0.001 2>&1 | grep -E "^search|offered|achieved|corrected|GENERATOR|unsent|server" ;;
  esac
  stop
 done
done
echo "end $(date -u +%FT%TZ); uptime: $(uptime)"
rm -rf $W
