#!/usr/bin/env bash
# Profile the server saturated by bench_ens misses (closed loop 32 x 16, cache off).
# Usage: [PERFOPTS="-F 1999 --call-graph dwarf,16384"] [OUTDATA=FILE] perf/results/2026-12-01-hitpath/profile-miss.sh
set -eu
cd "$(dirname "$0")/../../.."  # the repository root
BIN=${BIN:-target/release}
work=$(mktemp -d /tmp/hpm.XXXX)
$BIN/beast demo-models --out $work/models 2>/dev/null
printf '[cache]\nenabled = false\n' > $work/beast.toml
port=7986
: > $work/serve.log
taskset -c 0 $BIN/beast serve --models $work/models --cores 0 --listen 127.0.0.1:$port --admin-listen off --config $work/beast.toml 2> $work/serve.log &
spid=$!
for _ in $(seq 100); do grep -q listening $work/serve.log && break; sleep 0.1; done
taskset -c 1 target/release/beast-bench --server 127.0.0.1:$port --cpus 1 --target bench_ens --no-cache -c 32 -k 16 --duration 6 --warmup 1 --closed --max-error-fraction 1 > $work/bench.out 2>&1 &
bpid=$!
sleep 2
perf record ${PERFOPTS:--F 4999 -g} -o ${OUTDATA:-/tmp/hpm.data} -p $spid -- sleep 4 2>/dev/null || true
wait $bpid
kill $spid; wait $spid 2>/dev/null || true
grep achieved $work/bench.out
rm -rf $work
