#!/usr/bin/env bash
# Profile the cache-hit path: one server on core 0, beast-bench on core 1,
# 50 connections x DEPTH hits in flight (bench_a, 64 distinct rows), and
# `perf PERFCMD -p <server pid> -- sleep PSECS` in the middle of the run.
#
#   perf/profile_hit.sh                                   # perf stat (syscalls, switches) at depth 16
#   PERFCMD="record -F 4999 -g -o /tmp/hit.data" perf/profile_hit.sh
#   DEPTH=1 TOML='uring_sockets = false' perf/profile_hit.sh   # the glommio-streams path
#   CHRT=1 ...    # server and bench as SCHED_FIFO 1 (see perf/profile-hit.md:
#                 # on a VM shared with compiling neighbours, plain priority
#                 # leaves both idle most of the time, waiting for a CPU)
# Prints beast-bench's summary, then perf's output.
set -eu
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release}
DEPTH=${DEPTH:-16}
SECS=${SECS:-6}
PSECS=${PSECS:-3}
PERFCMD=${PERFCMD:-stat -e task-clock,context-switches,raw_syscalls:sys_enter,syscalls:sys_enter_io_uring_enter,syscalls:sys_enter_recvfrom,syscalls:sys_enter_sendto}
RT=; [ -n "${CHRT:-}" ] && RT="chrt -f 1"
work=$(mktemp -d /tmp/beast-prof.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$work"' EXIT
$BIN/beast demo-models --out "$work/models" 2>/dev/null
printf '%s\n[cache]\nl2_path = "%s"\n' "${TOML:-}" "$work/l2.cache" > "$work/beast.toml"
port=${PORT:-7981}
$RT taskset -c 0 $BIN/beast serve --models "$work/models" --cores 0 --listen 127.0.0.1:$port \
  --admin-listen off --config "$work/beast.toml" 2> "$work/serve.log" &
spid=$!
for _ in $(seq 100); do grep -q listening "$work/serve.log" && break; sleep 0.1; done
$RT taskset -c 1 $BIN/beast-bench --server 127.0.0.1:$port --cpus 1 --target bench_a --distinct 64 \
  -c 50 --duration "$SECS" --warmup 1 --closed -k "$DEPTH" > "$work/bench.out" 2>&1 &
bpid=$!
sleep 2
perf $PERFCMD -p $spid -- sleep "$PSECS" 2> "$work/perf.out" || true
wait $bpid || true
kill $spid; wait $spid 2>/dev/null || true
grep -E "achieved|busiest|uring" "$work/bench.out" "$work/serve.log" || true
cat "$work/perf.out"
