#!/usr/bin/env bash
# Run the standard benchmark scenarios (perf/scenarios/*.env) against a
# pinned server and write perf/results/YYYY-MM-DD-<shortsha>.md.
#
#   perf/run-all.sh            # full: 2 s warm-up + 10 s per rate
#   perf/run-all.sh --quick    # short: 0.3 s warm-up + 1 s per rate
#
# Environment: NO_BUILD=1 (use the binaries in target/release as they are),
# SERVER_CPU (default 0), BENCH_CPUS (default 1), PORT
# (default 7990), ADMIN_PORT (default 7991: the server's admin HTTP port,
# scraped by beast-bench --admin for batch sizes and cache hits),
# SCENARIOS (glob, default perf/scenarios/*.env), OUT (results file).
#
# A scenario file is shell: DESCRIPTION, BENCH_ARGS (beast-bench flags) and
# SWEEP (offered rates). Rates the server cannot take are recorded, not
# fatal: a failed run is noted in the results and the script goes on.
set -euo pipefail

cd "$(dirname "$0")/.."
QUICK=0
for a in "$@"; do
    case "$a" in
        --quick) QUICK=1 ;;
        -h|--help) sed -n 2,17p "$0"; exit 0 ;;
        *) echo "run-all.sh: unknown argument '$a' (try --quick)" >&2; exit 2 ;;
    esac
done
if [ "$QUICK" = 1 ]; then DUR="--duration 1 --warmup 0.3"; else DUR="--duration 10 --warmup 2"; fi
SERVER_CPU=${SERVER_CPU:-0}
BENCH_CPUS=${BENCH_CPUS:-1}
PORT=${PORT:-7990}
ADDR=127.0.0.1:$PORT
ADMIN=127.0.0.1:${ADMIN_PORT:-7991}

if [ "${NO_BUILD:-0}" != 1 ]; then
    echo "run-all: building release" >&2
    cargo build --release --bin beast --bin beast-bench >&2
fi

SHA=$(git rev-parse --short HEAD)
DIRTY=$(git status --porcelain --untracked-files=no | grep -q . && echo " (with uncommitted changes)" || true)
OUT=${OUT:-perf/results/$(date -u +%Y-%m-%d)-$SHA.md}
mkdir -p "$(dirname "$OUT")"
# The server runs in a fresh folder: its L2 cache file (created in its
# working directory) starts cold every time and stays out of the checkout.
WORK=$(mktemp -d /tmp/beast-run-all.XXXXXX)
MODELS=$WORK/models
LOG=$WORK/server.log
target/release/beast demo-models --out "$MODELS" >&2

BEAST=$PWD/target/release/beast
(cd "$WORK" && exec taskset -c "$SERVER_CPU" "$BEAST" serve --models "$MODELS" --cores "$SERVER_CPU" --listen "$ADDR" --admin-listen "$ADMIN") >"$LOG" 2>&1 &
SERVER_PID=$!
stop_server() {
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID"
        wait "$SERVER_PID" || true
    fi
    rm -rf "$WORK"
}
trap stop_server EXIT
for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then break; fi
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "run-all: server exited:" >&2; cat "$LOG" >&2; exit 1; }
    sleep 0.1
done

ADMIN_ARGS="--admin $ADMIN"
MODEL_NAME=$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1)
{
    echo "# beast benchmark results $(date -u +%Y-%m-%d)"
    echo
    echo "- commit: \`$(git rev-parse HEAD)\`$DIRTY ($(git log -1 --format=%s | head -c 80))"
    echo "- machine: $MODEL_NAME; $(nproc) CPUs online; $(uname -r)"
    echo "- load average at start: $(cut -d' ' -f1-3 /proc/loadavg) (a shared machine inflates tails: compare ratios within one file)"
    echo "- mode: $([ "$QUICK" = 1 ] && echo "--quick (1 s per rate: indicative only)" || echo "full (10 s per rate after 2 s warm-up)")"
    echo "- server: \`taskset -c $SERVER_CPU target/release/beast serve --models MODELS --cores $SERVER_CPU --listen $ADDR --admin-listen $ADMIN\` run in a fresh folder (cold L2 cache), models from \`target/release/beast demo-models --out MODELS\`"
    echo "- server start-up log:"
    echo
    echo '```'
    cat "$LOG"
    echo '```'
} >"$OUT"

# "cpuN total idle" jiffies for the server and generator cores, to show how
# busy other processes kept them (a shared machine's usual trouble).
core_ticks() {
    awk -v cpus=" $SERVER_CPU ${BENCH_CPUS//,/ } " '$1 ~ /^cpu[0-9]+$/ {
        n = substr($1, 4); if (index(cpus, " " n " ") == 0) next
        t = 0; for (i = 2; i <= NF; i++) t += $i
        printf "%s %d %d\n", $1, t, $5 + $6 }' /proc/stat
}
idle_report() { # before after
    join <(echo "$1") <(echo "$2") | awk '{ d = $4 - $2; printf "%s %.0f%% idle; ", $1, (d > 0 ? 100 * ($5 - $3) / d : 0) }'
}

FAILED=0
for f in ${SCENARIOS:-perf/scenarios/*.env}; do
    DESCRIPTION=""; BENCH_ARGS=""; SWEEP=""
    # shellcheck disable=SC1090
    . "$f"
    CMD="target/release/beast-bench --server $ADDR --cpus $BENCH_CPUS $BENCH_ARGS --sweep $SWEEP $DUR $ADMIN_ARGS"
    echo "run-all: $(basename "$f"): $DESCRIPTION" >&2
    echo "run-all: $CMD" >&2
    BEFORE=$(core_ticks)
    set +e
    TABLE=$($CMD 2>&1)
    RC=$?
    set -e
    IDLE=$(idle_report "$BEFORE" "$(core_ticks)")
    echo "$TABLE" >&2
    {
        echo
        echo "## $(basename "$f" .env): $DESCRIPTION"
        echo
        echo '```'
        echo "$CMD"
        echo '```'
        echo
        echo '```'
        echo "$TABLE"
        echo '```'
        echo
        echo "Cores during this scenario (whole machine, all processes): $IDLE"
        [ "$RC" = 0 ] || echo "beast-bench exited $RC: at least one rate had errors or unanswered requests beyond --max-error-fraction (see the tables)."
    } >>"$OUT"
    [ "$RC" = 0 ] || FAILED=$((FAILED + 1))
done
echo "run-all: results in $OUT ($FAILED scenario(s) with failed rates)" >&2
