#!/usr/bin/env bash
# Batching latency: bench_ens on one server core, all-miss (--no-cache).
# For each server binary (an old build and the current one, run in turn so
# both see the same neighbours): (a) a lone request, closed loop, one
# connection, one in flight: latency is compute + network + whatever the
# batch policy adds (and (a') the same for one model, bench_a, whose queue
# time is the batch policy's alone: an ensemble's queue time includes its
# members computing one after another); (b) an open-loop sweep of offered
# rates with --plot; (c) saturation, closed loop, with OK answers per CPU
# second the server got (on a shared machine the server rarely has its core
# alone: this ratio does not depend on how much of it it got).
#
#   perf/batching.sh                          # the current build only
#   BASE=/path/to/old/beast perf/batching.sh  # old and new, side by side
#
# Environment: BASE, NEW (default target/release/beast), BENCH (default
# target/release/beast-bench), NO_BUILD=1, SERVER_CPU (0), BENCH_CPUS (1),
# PORT (7996), ADMIN_PORT (7997), LONE_DURATION (5), RATES
# (1000,5000,10000,20000,30000,40000,50000), DURATION (3), WARMUP (1),
# ROUNDS (1; base and new take turns, round after round),
# OUT (results folder; default perf/results/DATE-SHA-batching).
set -euo pipefail

cd "$(dirname "$0")/.."
if [ "${NO_BUILD:-0}" != 1 ]; then
    echo "batching: building release" >&2
    cargo build --release --bin beast --bin beast-bench >&2
fi
NEW=${NEW:-$PWD/target/release/beast}
BENCH=${BENCH:-$PWD/target/release/beast-bench}
BASE=${BASE:-}
SERVER_CPU=${SERVER_CPU:-0}
BENCH_CPUS=${BENCH_CPUS:-1}
PORT=${PORT:-7996}
ADDR=127.0.0.1:$PORT
ADMIN=127.0.0.1:${ADMIN_PORT:-7997}
LONE_DURATION=${LONE_DURATION:-5}
RATES=${RATES:-1000,5000,10000,20000,30000,40000,50000}
DURATION=${DURATION:-3}
ROUNDS=${ROUNDS:-1}
WARMUP=${WARMUP:-1}
SHA=$(git rev-parse --short HEAD)
OUT=${OUT:-perf/results/$(date -u +%Y-%m-%d)-$SHA-batching}
mkdir -p "$OUT"

WORK=$(mktemp -d /tmp/beast-batching.XXXXXX)
SERVER_PID=
stop_server() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID"
        wait "$SERVER_PID" || true
    fi
    SERVER_PID=
}
cleanup() { stop_server; rm -rf "$WORK"; }
trap cleanup EXIT
# The oldest binary writes the models: newer ones read its model.toml too.
"${BASE:-$NEW}" demo-models --out "$WORK/models" >&2

start_server() {
    local dir
    dir=$(mktemp -d "$WORK/run.XXXXXX")
    (cd "$dir" && exec taskset -c "$SERVER_CPU" "$1" serve --models "$WORK/models" --cores "$SERVER_CPU" --listen "$ADDR" --admin-listen "$ADMIN") >"$dir/server.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then return 0; fi
        kill -0 "$SERVER_PID" 2>/dev/null || { echo "batching: server exited:" >&2; cat "$dir/server.log" >&2; exit 1; }
        sleep 0.1
    done
    echo "batching: server did not listen" >&2
    exit 1
}

# Server CPU seconds so far (all its threads), from /proc.
server_cpu() {
    awk -v hz="$(getconf CLK_TCK)" '{ printf "%.3f", ($14 + $15) / hz }' "/proc/$SERVER_PID/stat"
}
# OK responses the server has sent so far (its own counter).
server_ok() {
    local text
    exec 3<>"/dev/tcp/${ADMIN%:*}/${ADMIN#*:}"
    printf 'GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n' >&3
    text=$(cat <&3)
    exec 3<&-
    awk '/^beast_requests_total\{.*status="ok"/ { s += $NF } END { printf "%.0f", s }' <<<"$text"
}

bench() { # TARGET FLAGS...
    local target=$1
    shift
    taskset -c "$BENCH_CPUS" "$BENCH" --server "$ADDR" --admin "$ADMIN" --cpus "$BENCH_CPUS" \
        --target "$target" --no-cache "$@"
}

run_one() { # LABEL BINARY
    local label=$1 bin=$2
    echo "== $label: $bin (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
    start_server "$bin"
    echo "-- (a) lone request: closed loop, 1 connection, 1 in flight"
    bench bench_ens --closed -c 1 -k 1 --duration "$LONE_DURATION" --warmup "$WARMUP"
    echo "-- (a') the same, one model (bench_a): its queue time is the batch policy's alone"
    bench bench_a --closed -c 1 -k 1 --duration "$LONE_DURATION" --warmup "$WARMUP"
    echo "-- (b) sweep: open loop, 16 connections x 64 in flight, rates $RATES"
    bench bench_ens -c 16 -k 64 --sweep "$RATES" --duration "$DURATION" --warmup "$WARMUP" \
        --max-error-fraction 1 --plot "$OUT/$label-sweep.svg" --csv | tee "$OUT/$label-sweep.csv"
    echo "-- (c) saturation: closed loop, 16 connections x 64 in flight"
    local c0 k0 c1 k1
    c0=$(server_cpu); k0=$(server_ok)
    bench bench_ens --closed -c 16 -k 64 --duration "$DURATION" --warmup "$WARMUP"
    c1=$(server_cpu); k1=$(server_ok)
    echo "   server: $((k1 - k0)) ok in $(awk -v a="$c0" -v b="$c1" 'BEGIN { printf "%.2f", b - a }') CPU-s = $(awk -v k="$((k1 - k0))" -v a="$c0" -v b="$c1" 'BEGIN { printf "%.0f", k / (b - a) }') ok per CPU-s (warm-up included)"
    stop_server
}

{
    echo "batching: $(date -u +%FT%TZ), HEAD $SHA, $(nproc) CPUs, server on $SERVER_CPU, load on $BENCH_CPUS"
    for r in $(seq "$ROUNDS"); do
        sfx=$([ "$ROUNDS" = 1 ] || echo "-r$r")
        if [ -n "$BASE" ]; then run_one "base$sfx" "$BASE"; fi
        run_one "new$sfx" "$NEW"
    done
} 2>&1 | tee "$OUT/run.log"
