#!/usr/bin/env bash
# Overload with deadlines: bench_ens on one server core, all-miss, at twice
# its saturation rate with 20 ms budgets. For each server binary (e.g. an
# old build and the current one, run alternately so both see the same
# neighbours): the no-deadline saturation rate (closed loop), then an open
# loop at FACTOR x that rate with --deadline-us. The figure of merit is OK
# answers per second against the saturation rate, and how many OK answers
# came later than the deadline + 1 ms.
#
#   perf/overload.sh                          # the current build only
#   BASE=/path/to/old/beast perf/overload.sh  # old and new, side by side
#
# Environment: BASE (an older beast binary to compare), NEW (default
# target/release/beast), BENCH (default target/release/beast-bench; one
# generator for every server: the wire protocol is the same), NO_BUILD=1,
# SERVER_CPU (0), BENCH_CPUS (1), PORT (7994), ADMIN_PORT (7995),
# DEADLINE_US (20000), FACTOR (2), DURATION (10), WARMUP (2), ROUNDS (1),
# OUT (results file; default perf/results/DATE-SHA-overload.md).
set -euo pipefail

cd "$(dirname "$0")/.."
if [ "${NO_BUILD:-0}" != 1 ]; then
    echo "overload: building release" >&2
    cargo build --release --bin beast --bin beast-bench >&2
fi
NEW=${NEW:-$PWD/target/release/beast}
BENCH=${BENCH:-$PWD/target/release/beast-bench}
BASE=${BASE:-}
SERVER_CPU=${SERVER_CPU:-0}
BENCH_CPUS=${BENCH_CPUS:-1}
PORT=${PORT:-7994}
ADDR=127.0.0.1:$PORT
ADMIN=127.0.0.1:${ADMIN_PORT:-7995}
DEADLINE_US=${DEADLINE_US:-20000}
FACTOR=${FACTOR:-2}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
ROUNDS=${ROUNDS:-1}
SHA=$(git rev-parse --short HEAD)
OUT=${OUT:-perf/results/$(date -u +%Y-%m-%d)-$SHA-overload.md}
mkdir -p "$(dirname "$OUT")"

WORK=$(mktemp -d /tmp/beast-overload.XXXXXX)
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
# The base binary writes the models when given: a newer model.toml may carry
# keys (min_batch) an older binary refuses, while the new one reads the old.
"${BASE:-$NEW}" demo-models --out "$WORK/models" >&2

# start_server BINARY: a fresh folder (cold L2 cache) per start.
start_server() {
    local dir
    dir=$(mktemp -d "$WORK/run.XXXXXX")
    (cd "$dir" && exec taskset -c "$SERVER_CPU" "$1" serve --models "$WORK/models" --cores "$SERVER_CPU" --listen "$ADDR" --admin-listen "$ADMIN") >"$dir/server.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then return 0; fi
        kill -0 "$SERVER_PID" 2>/dev/null || { echo "overload: server exited:" >&2; cat "$dir/server.log" >&2; exit 1; }
        sleep 0.1
    done
    echo "overload: server did not listen" >&2
    exit 1
}

# Server CPU seconds so far (all its threads), from /proc.
server_cpu() {
    awk -v hz="$(getconf CLK_TCK)" '{ printf "%.3f", ($14 + $15) / hz }' "/proc/$SERVER_PID/stat"
}
# OK responses the server has sent so far (its own counter, over all targets).
server_ok() {
    local text
    exec 3<>"/dev/tcp/${ADMIN%:*}/${ADMIN#*:}"
    printf 'GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n' >&3
    text=$(cat <&3)
    exec 3<&-
    awk '/^beast_requests_total\{.*status="ok"/ { s += $NF } END { printf "%.0f", s }' <<<"$text"
}

json_field() { # NAME JSON: the number after "NAME":
    sed -n "s/.*\"$1\": *\([0-9.]*\).*/\1/p" <<<"$2" | head -1
}

COMMON="--server $ADDR --cpus $BENCH_CPUS --target bench_ens --no-cache --duration $DURATION --warmup $WARMUP --admin $ADMIN --max-error-fraction 1"
{
    echo "# overload with deadlines $(date -u +%Y-%m-%d)"
    echo
    echo "- commit: \`$(git rev-parse HEAD)\`"
    echo "- machine: $(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1); $(nproc) CPUs online; load average at start $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- servers: new \`$NEW\`${BASE:+, base \`$BASE\`}, each \`taskset -c $SERVER_CPU BEAST serve --cores $SERVER_CPU\`; generator on CPU(s) $BENCH_CPUS"
    echo "- saturation: \`beast-bench $COMMON --closed -c 16 -k 16\`"
    echo "- overload: \`beast-bench $COMMON --rate (FACTOR x saturation) -c 16 -k 64 --deadline-us $DEADLINE_US\`, FACTOR $FACTOR"
    echo
    echo "- per CPU-second: OK answers the server sent (its own counter) per second of CPU it got (/proc/PID/stat), over the whole beast-bench run (warm-up and drain included): on a shared machine the server rarely has its core alone, and this ratio does not depend on how much of it it got"
    echo
    echo "| round | server | saturation req/s | saturation ok per CPU-s | offered req/s | ok req/s | ok per CPU-s | ok / saturation (per CPU-s) | partial | late (client) | late (server total) | deadline exceeded | overloaded | unanswered |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
} >"$OUT"

one() { # ROUND NAME BINARY
    start_server "$3"
    local sat_json sat rate over c0 k0 c1 k1 c2 k2
    c0=$(server_cpu); k0=$(server_ok)
    sat_json=$($BENCH $COMMON --closed -c 16 -k 16 --json)
    c1=$(server_cpu); k1=$(server_ok)
    echo "$sat_json" >>"$WORK/$2.jsonl"
    sat=$(json_field achieved_rps "$sat_json")
    rate=$(awk -v s="$sat" -v f="$FACTOR" 'BEGIN { printf "%.0f", s * f }')
    # The saturation run's queue drains before the overload starts.
    over=$($BENCH $COMMON --rate "$rate" -c 16 -k 64 --deadline-us "$DEADLINE_US" --json)
    c2=$(server_cpu); k2=$(server_ok)
    echo "$over" >>"$WORK/$2.jsonl"
    local satc overc
    satc=$(awk -v k="$((k1 - k0))" -v a="$c0" -v b="$c1" 'BEGIN { printf "%.0f", k / (b - a) }')
    overc=$(awk -v k="$((k2 - k1))" -v a="$c1" -v b="$c2" 'BEGIN { printf "%.0f", k / (b - a) }')
    stop_server
    local ok partial late lates dl ov un
    ok=$(json_field achieved_rps "$over")
    partial=$(json_field partial "$over")
    late=$(json_field late "$over")
    lates=$(json_field late_server "$over")
    dl=$(json_field deadline_exceeded "$over")
    ov=$(json_field overloaded "$over")
    un=$(json_field unanswered "$over")
    echo "| $1 | $2 | $sat | $satc | $rate | $ok | $overc | $(awk -v o="$overc" -v s="$satc" 'BEGIN { printf "%.0f%%", 100 * o / s }') | $partial | $late | $lates | $dl | $ov | $un |" >>"$OUT"
    echo "overload: round $1 $2: saturation $sat req/s ($satc per CPU-s), at $rate: ok $ok req/s ($overc per CPU-s), partial $partial, late $late/$lates" >&2
}

for r in $(seq "$ROUNDS"); do
    [ -n "$BASE" ] && one "$r" base "$BASE"
    one "$r" new "$NEW"
done
{
    echo
    echo "Raw JSON lines (saturation run, then overload run, per round):"
    for n in base new; do
        [ -f "$WORK/$n.jsonl" ] || continue
        echo
        echo "$n:"
        echo
        echo '```'
        cat "$WORK/$n.jsonl"
        echo '```'
    done
} >>"$OUT"
echo "overload: results in $OUT" >&2
cat "$OUT"
