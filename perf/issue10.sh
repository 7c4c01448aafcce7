#!/usr/bin/env bash
# Every row of the issue #10 table, base commit vs this tree, in one run.
#
#   perf/issue10.sh BASE_COMMIT            # e.g. perf/issue10.sh 8326b70
#   SECS=2 ROUNDS=1 perf/issue10.sh 8326b70   # a quick check of the script
#
# Builds this tree (`cargo build --release`: beast, beast-bench,
# examples/backend_throughput) and BASE_COMMIT (in a git worktree under
# target/issue10-base/<commit>, its own target dir, kept for the next run;
# BASE_BIN_DIR=<dir with beast and examples/backend_throughput> uses a
# build you already have). Build time is not part of the budget below.
#
# Then, ROUNDS times (default 3), base and new alternating inside each row,
# one fresh server per row and binary, server `taskset -c 0 beast serve
# --cores 0`, load `taskset -c 1 beast-bench` (the new beast-bench for
# both), cache off except row 6:
#   1. a lone bench_ens request (closed loop, 1 connection x 1): server total p50, mean queue, mean compute;
#   2. bench_ens open loop at 8k and 16k req/s (16 conns x 64): corrected p50
#      (and the Python asyncio + ONNX Runtime peer when PEERS=<dir with
#      serve_ort.py, loadgen.py, build_models.py> and onnxruntime import);
#   3/4. the CPU kernel alone at batch 64 (each binary's own
#      examples/backend_throughput), then the server saturated (closed loop,
#      32 x 16): server rows per CPU-second (from /proc/PID/stat), server /
#      kernel, and CPU per request outside the kernel (1/server - 1/kernel);
#   5. the highest bench_ens rate with corrected p95 < 50 ms (--search);
#   6. cache hits (bench_a, 64 distinct rows, all hits) vs Redis GET of 64
#      bytes, closed loop, 50 connections x 1 and x 16 in flight.
# Measuring time: about ROUNDS x (2 x (22 + 13 x SECS) + 2 x SECS) s, i.e.
# ~7 minutes at the defaults (SECS=4, ROUNDS=3; 72 s for SECS=1 ROUNDS=1
# on the shared VM), under 12.
#
# Writes the raw log to perf/results/<date>-issue10-<base>-vs-<new>/run.log
# and a markdown section (medians over the rounds, every round's figures
# listed) to stdout and, unless NO_WRITE=1, to the end of perf/issue10-table.md.
# Needs redis-server and redis-benchmark (apt-get install -y redis-server
# redis-tools) for row 6 (skipped with a note when missing). Two CPUs at
# least (server on 0, load on 1). Run it on a quiet machine: the log
# records the load average before every point.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${1:?usage: perf/issue10.sh BASE_COMMIT   (see the header of this script)}
SECS=${SECS:-4}
ROUNDS=${ROUNDS:-3}
PORT=${PORT:-7996}
ADMIN=$((PORT + 1))
RPORT=${RPORT:-6395}
base_rev=$(git rev-parse --short "$BASE^{commit}")
new_rev=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src tools examples Cargo.toml || echo "+dirty")

# --- builds -----------------------------------------------------------------
echo "building new ($new_rev) ..." >&2
nice cargo build --release --bin beast --bin beast-bench --example backend_throughput >&2
NEW_DIR=$PWD/target/release
if [ -n "${BASE_BIN_DIR:-}" ]; then
  BASE_DIR=$BASE_BIN_DIR
else
  src=$PWD/target/issue10-base/$base_rev/src
  BASE_DIR=$PWD/target/issue10-base/$base_rev/target/release
  if [ ! -x "$BASE_DIR/beast" ] || [ ! -x "$BASE_DIR/examples/backend_throughput" ]; then
    echo "building base ($base_rev) in $src (first time only) ..." >&2
    [ -d "$src" ] || git worktree add --detach "$src" "$base_rev" >&2
    (cd "$src" && CARGO_TARGET_DIR=$PWD/../target nice cargo build --release --bin beast --example backend_throughput >&2)
  fi
fi
BENCH=$NEW_DIR/beast-bench
for f in "$BASE_DIR/beast" "$BASE_DIR/examples/backend_throughput" "$NEW_DIR/beast" "$BENCH"; do
  [ -x "$f" ] || { echo "missing $f" >&2; exit 1; }
done

out_dir=perf/results/$(date -u +%F)-issue10-$base_rev-vs-${new_rev%+dirty}
mkdir -p "$out_dir"
LOG=$out_dir/run.log
: > "$LOG"
W=$(mktemp -d /tmp/issue10.XXXXXX)
SP=; RP=; OP=
cleanup() { for p in $SP $RP $OP; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
log() { echo "$*" >> "$LOG"; }
load() { cut -d' ' -f1-3 /proc/loadavg; }

for b in base new; do
  d=BASE_DIR; [ $b = new ] && d=NEW_DIR
  "${!d}/beast" demo-models --out "$W/models-$b" >/dev/null 2>&1
done
printf '[cache]\nenabled = false\n' > "$W/nocache.toml"

start() { # label cache(on|off)
  local bin=$BASE_DIR/beast; [ "$1" = new ] && bin=$NEW_DIR/beast
  local cfg=$W/nocache.toml
  if [ "$2" = on ]; then rm -f "$W/l2.cache"; printf '[cache]\nl2_path = "%s"\n' "$W/l2.cache" > "$W/cache.toml"; cfg=$W/cache.toml; fi
  : > "$W/serve.log" # emptied here, not by the background redirection (a race with the grep below)
  taskset -c 0 "$bin" serve --models "$W/models-$1" --cores 0 --listen 127.0.0.1:$PORT \
    --admin-listen 127.0.0.1:$ADMIN --config "$cfg" > "$W/serve.log" 2>&1 &
  SP=$!
  for _ in $(seq 200); do grep -q listening "$W/serve.log" && return 0; sleep 0.05; done
  echo "server $1 did not start:" >&2; cat "$W/serve.log" >&2; exit 1
}
stop() { kill -TERM "$SP" 2>/dev/null; wait "$SP" 2>/dev/null || true; SP=; }
ticks() { awk '{print $14 + $15}' "/proc/$SP/stat"; }
# A run that fails its error budget still prints its JSON line; never abort the whole script on it.
bench() { taskset -c 1 "$BENCH" --server 127.0.0.1:$PORT --admin 127.0.0.1:$ADMIN --cpus 1 --json "$@" 2>>"$LOG" || true; }
# rec ROW LABEL KEY VALUE: one figure, for the summary
rec() { echo "$1 $2 $3 $4" >> "$W/figures"; log "  figure: row $1 $2 $3 = $4"; }
j() { python3 -c 'import json,sys
key=sys.argv[1].split(".")
for line in sys.stdin:
    line=line.strip()
    if not line.startswith("{"): continue
    v=json.loads(line)
    for k in key: v=v.get(k) if isinstance(v,dict) else None
    if v is not None: print(v)' "$1"; }

have_redis=1; command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null || have_redis=0
peers=${PEERS:-}
if [ -n "$peers" ] && ! python3 -c 'import onnxruntime' 2>/dev/null; then peers=; fi

log "issue10 run $(date -u +%FT%TZ); base $base_rev ($BASE_DIR), new $new_rev ($NEW_DIR); SECS=$SECS ROUNDS=$ROUNDS"
log "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs; uptime: $(uptime)"
t_start=$(date +%s)
: > "$W/figures"
for round in $(seq "$ROUNDS"); do
  log ""; log "######## round $round, loadavg $(load)"
  for b in base new; do
    kdir=$BASE_DIR; [ $b = new ] && kdir=$NEW_DIR
    # 1. lone request
    log "==== row1 $b loadavg $(load): bench --target bench_ens --no-cache --closed -c 1 -k 1 --duration $SECS --warmup 1"
    start $b off
    r=$(bench --target bench_ens --no-cache --closed -c 1 -k 1 --duration "$SECS" --warmup 1); log "$r"
    rec 1 $b total_p50_us "$(echo "$r" | j server.total_p50_us)"
    rec 1 $b queue_us "$(echo "$r" | j server.mean_queue_us)"
    rec 1 $b compute_us "$(echo "$r" | j server.mean_compute_us)"
    stop
    # 2. open loop 8k / 16k
    log "==== row2 $b loadavg $(load): bench --target bench_ens --no-cache -c 16 -k 64 --sweep 8000,16000 --duration $SECS --warmup 1 --max-error-fraction 1"
    start $b off
    r=$(bench --target bench_ens --no-cache -c 16 -k 64 --sweep 8000,16000 --duration "$SECS" --warmup 1 --max-error-fraction 1); log "$r"
    p=($(echo "$r" | j latency_ms.p50)); g=($(echo "$r" | j generator_limited))
    rec 2 $b p50_8k_ms "${p[0]:-nan}"; rec 2 $b p50_16k_ms "${p[1]:-nan}"
    [ "${g[*]}" = "False False" ] || log "  note: generator-limited flags: ${g[*]}"
    stop
    # 3/4. kernel, then saturation
    log "==== row3 $b loadavg $(load): taskset -c 0 $kdir/examples/backend_throughput --secs 2 --batches 64"
    k=$(taskset -c 0 "$kdir/examples/backend_throughput" --secs 2 --batches 64 2>&1); log "$k"
    kcpu=$(echo "$k" | awk '$1 == "batch" && $2 == 64 {print $8; exit}')
    log "==== row3 $b loadavg $(load): bench --target bench_ens --no-cache --closed -c 32 -k 16 --duration $SECS --warmup 1 --max-error-fraction 1 (server CPU from /proc/PID/stat)"
    start $b off
    t0=$(ticks); r=$(bench --target bench_ens --no-cache --closed -c 32 -k 16 --duration "$SECS" --warmup 1 --max-error-fraction 1); t1=$(ticks); log "$r"
    ok=$(echo "$r" | j ok)
    srv=$(awk -v ok="$ok" -v s="$SECS" -v t=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" 'BEGIN { c = t / hz; if (c > 0) printf "%.0f", ok * (s + 1) / s / c; else print "nan" }')
    log "  server CPU ticks $((t1 - t0)); server rows per CPU-s $srv; kernel rows per CPU-s at batch 64 $kcpu"
    rec 3 $b server_rows_per_cpu_s "$srv"; rec 3 $b kernel_rows_per_cpu_s "$kcpu"
    rec 3 $b ratio "$(awk -v a="$srv" -v k="$kcpu" 'BEGIN { if (k > 0 && a > 0) printf "%.3f", a / k; else print "nan" }')"
    rec 4 $b outside_us "$(awk -v a="$srv" -v k="$kcpu" 'BEGIN { if (k > 0 && a > 0) printf "%.2f", 1e6 / a - 1e6 / k; else print "nan" }')"
    stop
    # 5. SLO search
    log "==== row5 $b loadavg $(load): bench --target bench_ens --no-cache -c 32 -k 16 --search 10000:60000 --slo-p95-ms 50 --search-steps 5 --duration $SECS --warmup 0.5 --max-error-fraction 0.001"
    start $b off
    r=$(bench --target bench_ens --no-cache -c 32 -k 16 --search 10000:60000 --slo-p95-ms 50 --search-steps 5 --duration "$SECS" --warmup 0.5 --max-error-fraction 0.001 || true); log "$r"
    best=$(echo "$r" | j search_result.best_rps | tail -n 1)
    # No rate met the SLO: recorded as 0, shown as "< 10k".
    rec 5 $b best_rps "${best:-0}"
    [ "$(echo "$r" | j search_result.generator_limited_trials | tail -n 1)" = False ] || log "  note: some search trials were generator-limited"
    stop
    # 6. cache hits vs Redis
    if [ $have_redis = 1 ]; then
      start $b on
      for depth in 1 16; do
        log "==== row6 $b depth $depth loadavg $(load): bench --target bench_a --distinct 64 -c 50 --closed -k $depth --duration $SECS --warmup 1 --max-error-fraction 0.001"
        r=$(bench --target bench_a --distinct 64 -c 50 --closed -k $depth --duration "$SECS" --warmup 1 --max-error-fraction 0.001); log "$r"
        rec 6 $b hit_rps_d$depth "$(echo "$r" | j achieved_rps)"
        [ "$(echo "$r" | j generator_limited)" = False ] || log "  note: GENERATOR-LIMITED (beast-bench was the limit at depth $depth)"
      done
      stop
    fi
  done
  # Redis once per round, right after both beast servers.
  if [ $have_redis = 1 ]; then
    taskset -c 0 redis-server --port $RPORT --save '' --appendonly no > "$W/redis.log" 2>&1 &
    RP=$!
    for _ in $(seq 100); do redis-cli -p $RPORT ping >/dev/null 2>&1 && break; sleep 0.05; done
    for depth in 1 16; do
      n=$(awk -v s="$SECS" -v d=$depth 'BEGIN { printf "%d", (d == 1 ? 80000 : 1200000) * s }')
      log "==== row6 redis depth $depth loadavg $(load): taskset -c 1 redis-benchmark -p $RPORT -c 50 -P $depth -t get -d 64 -n $n --csv"
      r=$(taskset -c 1 redis-benchmark -p $RPORT -c 50 -P $depth -t get -d 64 -n "$n" --csv 2>/dev/null | tail -n 1); log "$r"
      rec 6 redis get_rps_d$depth "$(echo "$r" | awk -F'","' '{print $2}')"
    done
    kill $RP; wait $RP 2>/dev/null || true; RP=
  fi
  # The peer for row 2, once per round.
  if [ -n "$peers" ]; then
    python3 "$peers/build_models.py" --out "$W/onnx" > /dev/null 2>&1 || true
    taskset -c 0 python3 "$peers/serve_ort.py" --model "$W/onnx/ensemble.onnx" --port 17000 --max-batch 32 > "$W/ort.log" 2>&1 &
    OP=$!
    for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/17000) 2>/dev/null && break; sleep 0.2; done
    pp=$PYTHONPATH; python3 -c 'import sysnoise' 2>/dev/null || pp=$PWD/perf/results/2026-12-01-issue10:${PYTHONPATH:-}
    for r in 8000 16000; do
      log "==== row2 peer $r loadavg $(load): taskset -c 1 python3 $peers/loadgen.py --port 17000 --rate $r --duration $SECS --warmup 1 --drain 2"
      o=$(PYTHONPATH=$pp taskset -c 1 python3 "$peers/loadgen.py" --port 17000 --rate $r --duration "$SECS" --warmup 1 --drain 2 --server-pid $OP 2>&1 || true); log "$o"
      rec 2 peer p50_$((r / 1000))k_ms "$(echo "$o" | awk '$1 ~ /^[0-9]+$/ && $1 == '$r' {print $3; exit}')"
    done
    kill $OP; wait $OP 2>/dev/null || true; OP=
  fi
done
t_end=$(date +%s)
log ""; log "end $(date -u +%FT%TZ) ($((t_end - t_start)) s); uptime: $(uptime)"
cp "$W/figures" "$out_dir/figures.txt"

# --- the section --------------------------------------------------------------
section=$(python3 - "$W/figures" "$base_rev" "$new_rev" "$SECS" "$ROUNDS" "$LOG" "$((t_end - t_start))" <<'PY'
import sys, statistics as st
path, base, new, secs, rounds, log, took = sys.argv[1:]
fig = {}
for line in open(path):
    p = line.split()
    if len(p) < 4: continue
    try: v = float(p[3])
    except ValueError: continue
    if v != v: continue
    fig.setdefault((p[0], p[1], p[2]), []).append(v)
def med(row, who, key):
    v = fig.get((row, who, key))
    return st.median(v) if v else None
def all_(row, who, key, f):
    v = fig.get((row, who, key))
    return ", ".join(f(x) for x in v) if v else "-"
def fmt(x, f): return "-" if x is None else f(x)
def ratio(a, b, f="{:.2f}"):
    return "-" if a is None or b is None or b == 0 else f.format(a / b)
i = lambda x: f"{x:.0f}"; ms = lambda x: f"{x:.2f}"; r2 = lambda x: f"{x:.2f}"; k = lambda x: f"{x/1000:.1f}k" if x > 0 else "< 10k"
rows = []
b1, n1 = med("1","base","total_p50_us"), med("1","new","total_p50_us")
rows.append(("1. lone bench_ens request, idle server: server total p50 (mean queue + mean compute)", "~480 µs",
  f"**{fmt(b1,i)} µs** ({fmt(med('1','base','queue_us'),i)} + {fmt(med('1','base','compute_us'),i)}); runs {all_('1','base','total_p50_us',i)}",
  f"**{fmt(n1,i)} µs** ({fmt(med('1','new','queue_us'),i)} + {fmt(med('1','new','compute_us'),i)}); runs {all_('1','new','total_p50_us',i)}",
  ratio(n1,b1), "queue ≤ 20 µs"))
for kk, lab in (("p50_8k_ms","8k"),("p50_16k_ms","16k")):
  b, n = med("2","base",kk), med("2","new",kk)
  peer = med("2","peer",kk)
  rows.append((f"2. bench_ens corrected p50 at {lab} req/s, open loop", "0.58 / 0.88 ms",
    f"**{fmt(b,ms)} ms** ({all_('2','base',kk,ms)})", f"**{fmt(n,ms)} ms** ({all_('2','new',kk,ms)})", ratio(n,b),
    "below peer" + (f": peer **{fmt(peer,ms)} ms** ({all_('2','peer',kk,ms)})" if peer is not None else " (peer not run: PEERS unset or onnxruntime missing)")))
b, n = med("3","base","ratio"), med("3","new","ratio")
rows.append(("3. server / kernel at saturation (rows per CPU-s)", "0.84",
  f"**{fmt(b,r2)}** (server {fmt(med('3','base','server_rows_per_cpu_s'),k)}, kernel {fmt(med('3','base','kernel_rows_per_cpu_s'),k)}; pairs {all_('3','base','ratio',r2)})",
  f"**{fmt(n,r2)}** (server {fmt(med('3','new','server_rows_per_cpu_s'),k)}, kernel {fmt(med('3','new','kernel_rows_per_cpu_s'),k)}; pairs {all_('3','new','ratio',r2)})",
  ratio(n,b), "≥ 0.95"))
b, n = med("4","base","outside_us"), med("4","new","outside_us")
rows.append(("4. CPU per request outside the kernel, saturation", "~3.8 µs",
  f"**{fmt(b,r2)} µs** (pairs {all_('4','base','outside_us',r2)})", f"**{fmt(n,r2)} µs** (pairs {all_('4','new','outside_us',r2)})", ratio(n,b), "≤ 1.5 µs"))
b, n = med("5","base","best_rps"), med("5","new","best_rps")
rows.append(("5. highest bench_ens rate with corrected p95 < 50 ms, one core", "39.4k",
  f"**{fmt(b,k)}** ({all_('5','base','best_rps',k)})", f"**{fmt(n,k)}** ({all_('5','new','best_rps',k)})", ratio(n,b), "≥ 47k"))
cells = []
for who in ("base","new"):
  parts = []
  for d in ("1","16"):
    h, r = fig.get(("6",who,f"hit_rps_d{d}")), fig.get(("6","redis",f"get_rps_d{d}"))
    if h and r:
      pr = [a/b for a,b in zip(h,r) if b]
      parts.append(f"d{d}: **{st.median(pr):.2f}** ({', '.join(f'{x:.2f}' for x in pr)}; beast {st.median(h)/1000:.0f}k vs Redis {st.median(r)/1000:.0f}k req/s)")
    else:
      parts.append(f"d{d}: -")
  cells.append("; ".join(parts))
rows.append(("6. cache-hit path / Redis GET, depth 1 / 16, closed loop, 50 connections", "0.62 / 0.39", cells[0], cells[1], "-", "≥ 1.0 / 1.0"))
print(f"## Re-measured by perf/issue10.sh: base {base} vs new {new}\n")
print(f"- command: `SECS={secs} ROUNDS={rounds} perf/issue10.sh {base}` ({took} s of measuring); medians over the rounds in bold, each round's figure in brackets; base and new alternate inside every row of every round.")
print(f"- raw log (commands, load average before every point, every beast-bench JSON line): `{log}`.")
print("- server `taskset -c 0 beast serve --cores 0`, load `taskset -c 1` (the new beast-bench for both binaries); cache off except row 6.\n")
print("| figure | issue's \"now\" | before (" + base + ") | after (" + new + ") | after / before | target |")
print("|---|---:|---:|---:|---:|---|")
for r in rows: print("| " + " | ".join(r) + " |")
PY
)
echo "$section"
echo "$section" > "$out_dir/section.md"
if [ -z "${NO_WRITE:-}" ]; then
  printf '\n%s\n' "$section" >> perf/issue10-table.md
  echo "(appended to perf/issue10-table.md; raw log $LOG)" >&2
fi
