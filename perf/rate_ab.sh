#!/bin/bash
# Side-by-side open-loop runs of two beast binaries at fixed rates (the
# region where perf/issue10.sh's row-5 search decides), alternating A and B
# at every point, to find why the highest bench_ens rate with p95 < 50 ms
# moved. For each run: achieved rate, corrected and uncorrected p95,
# window-full count, mean batch, the generator's CPU and its flag, server
# CPU per request, and the server's and the generator's syscalls and
# io_uring submissions per request (perf stat tracepoints).
#
#   perf/rate_ab.sh BIN_A BIN_B "38000 41000 44000" [ROUNDS] [SECS]
#
# Server `taskset -c 0 BIN serve --cores 0` (cache off), load
# `taskset -c 1 beast-bench -c 32 -k 16` (the -c/-k of issue10.sh's row 5).
# One line per run on stdout (and the JSON lines in $OUT/ab.log).
set -uo pipefail
cd "$(dirname "$0")/.."
A=${1:?BIN_A}; B=${2:?BIN_B}; RATES=${3:?rates}; ROUNDS=${4:-3}; SECS=${5:-3}
BENCH=${BENCH:-$PWD/target/release/beast-bench}
PORT=${PORT:-7976}; ADMIN=$((PORT + 1))
OUT=${OUT:-$(mktemp -d /tmp/rate_ab.XXXXXX)}
mkdir -p "$OUT"
"$A" demo-models --out "$OUT/models" >/dev/null 2>&1
printf '[cache]\nenabled = false\n' > "$OUT/nocache.toml"
SP=
trap '[ -n "$SP" ] && kill $SP 2>/dev/null' EXIT
echo "# $(date -u +%FT%TZ) A=$A B=$B rates=$RATES rounds=$ROUNDS secs=$SECS; $(uptime)"
printf '%-4s %-6s %-2s %8s %8s %8s %6s %6s %5s %5s %7s %7s %7s %7s %7s\n' \
  round rate bin achieved p95ms unc_p95 wfull batch gcpu% glim srv_us/r s_sys/r s_uring/r c_sys/r load1
for round in $(seq "$ROUNDS"); do
  for rate in $RATES; do
    for who in A B; do
      bin=$A; [ $who = B ] && bin=$B
      : > "$OUT/serve.log"
      taskset -c 0 "$bin" serve --models "$OUT/models" --cores 0 --listen 127.0.0.1:$PORT \
        --admin-listen 127.0.0.1:$ADMIN --config "$OUT/nocache.toml" > "$OUT/serve.log" 2>&1 &
      SP=$!
      for _ in $(seq 200); do grep -q listening "$OUT/serve.log" && break; sleep 0.05; done
      load=$(cut -d' ' -f1 /proc/loadavg)
      taskset -c 1 "$BENCH" --server 127.0.0.1:$PORT --admin 127.0.0.1:$ADMIN --cpus 1 --json \
        --target bench_ens --no-cache -c 32 -k 16 --rate "$rate" --duration "$SECS" --warmup 0.5 \
        --max-error-fraction 1 > "$OUT/bench.json" 2>>"$OUT/ab.log" &
      BP=$!
      sleep 0.6
      t0=$(awk '{print $14 + $15}' /proc/$SP/stat)
      perf stat -x, -e raw_syscalls:sys_enter,io_uring:io_uring_submit_req -p $SP -o "$OUT/s.stat" -- sleep "$SECS" 2>/dev/null &
      PS=$!
      perf stat -x, -e raw_syscalls:sys_enter -p $BP -o "$OUT/c.stat" -- sleep "$SECS" 2>/dev/null
      wait $PS
      t1=$(awk '{print $14 + $15}' /proc/$SP/stat)
      wait $BP
      kill $SP; wait $SP 2>/dev/null; SP=
      cat "$OUT/bench.json" >> "$OUT/ab.log"
      python3 - "$OUT/bench.json" "$OUT/s.stat" "$OUT/c.stat" $((t1 - t0)) "$(getconf CLK_TCK)" "$SECS" "$round" "$rate" "$who" "$load" <<'PY'
import json, sys
bj, ss, cs, ticks, hz, secs, rnd, rate, who, load = sys.argv[1:]
lines = [json.loads(l) for l in open(bj) if l.startswith("{")]
if not lines:
    print(f"{rnd:<4} {rate:<6} {who:<2} no result from beast-bench (server did not start or bench failed; see ab.log)")
    sys.exit(0)
v = lines[-1]
def stat(p):
    d = {}
    for l in open(p):
        f = l.strip().split(",")
        if len(f) > 2 and f[0].replace(".", "").isdigit():
            d[f[2]] = float(f[0])
    return d
s, c = stat(ss), stat(cs)
# requests answered during the perf window ~ achieved rate x window
n = v["achieved_rps"] * float(secs) or float("nan")
srv_us = int(ticks) / int(hz) / n * 1e6 if n else float("nan")
print(f'{rnd:<4} {rate:<6} {who:<2} {v["achieved_rps"]:8.0f} {v["latency_ms"]["p95"]:8.2f} {v["uncorrected_ms"]["p95"]:8.2f} '
      f'{v["window_full"]:6d} {v["admin"]["mean_batch_size"]:6.1f} {v["client_thread_cpu_max_pct"]:5.0f} {str(v["generator_limited"])[0]:>5} '
      f'{srv_us:7.2f} {s.get("raw_syscalls:sys_enter", 0) / n:7.3f} {s.get("io_uring:io_uring_submit_req", 0) / n:7.3f} '
      f'{c.get("raw_syscalls:sys_enter", 0) / n:7.3f} {load:>7}')
PY
    done
  done
done
