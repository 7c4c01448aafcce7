#!/usr/bin/env bash
# profile the hit path: server core 0, bench core 1, closed loop depth 16
# Usage: [SECS=6] [DEPTH=16] [PERFCMD="record -F 4999 -g -o FILE" | "stat -e ..." | "trace -s -o FILE"] perf/results/2026-12-01-hitpath/profile.sh
# Profiles the server process (pid) for 3 s while beast-bench holds 50 x DEPTH hits in flight.
set -eu
cd "$(dirname "$0")/../../.."  # the repository root
BIN=${BIN:-target/release}
work=$(mktemp -d /tmp/hp.XXXX)
$BIN/beast demo-models --out $work/models 2>/dev/null
printf '[cache]\nl2_path = "%s"\n' "$work/l2.cache" > $work/beast.toml
port=${PORT:-7981}
taskset -c 0 $BIN/beast serve --models $work/models --cores 0 --listen 127.0.0.1:$port --admin-listen off --config $work/beast.toml 2> $work/serve.log &
spid=$!
for _ in $(seq 100); do grep -q listening $work/serve.log && break; sleep 0.1; done
taskset -c 1 $BIN/beast-bench --server 127.0.0.1:$port --cpus 1 --target bench_a --distinct 64 -c 50 --duration ${SECS:-6} --warmup 1 --closed -k ${DEPTH:-16} ${BENCHARGS:-} > $work/bench.out 2>&1 &
bpid=$!
sleep 2
perf ${PERFCMD:-record -g -o /tmp/hp.perf.data} -p $spid -- sleep 3 2> /tmp/hp.perfstat.txt || true
wait $bpid
kill $spid; wait $spid 2>/dev/null || true
tail -30 $work/bench.out
rm -rf $work
