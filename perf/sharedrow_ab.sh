#!/bin/bash
# Rows 3/4 of the issue #10 table (perf/issue10.sh's commands) for two
# builds side by side, alternating A/B (B/A in even rounds) so machine
# drift hits both: per run, the CPU kernel alone (each build's own
# examples/backend_throughput at batch 64, rows per CPU-s) and the server
# saturated (bench_ens, cache off, closed loop 32 x 16; server CPU from
# /proc/PID/stat), then server/kernel and CPU per request outside the
# kernel (1/server - 1/kernel).
#
#   perf/sharedrow_ab.sh DIR_A DIR_B [ROUNDS] [SECS]
#
# DIR_* hold `beast` and `examples/backend_throughput`. Server
# `taskset -c 0 beast serve --cores 0`, load `taskset -c 1 beast-bench`
# (this tree's; BENCH_PREFIX="chrt -f 2" runs it real-time, where another
# process hogs core 1). One line per run on stdout; the JSON lines in $OUT/ab.log.
set -uo pipefail
cd "$(dirname "$0")/.."
A=${1:?DIR_A}; B=${2:?DIR_B}; ROUNDS=${3:-4}; SECS=${4:-3}
BENCH=${BENCH:-$PWD/target/release/beast-bench}
PORT=${PORT:-7956}; ADMIN=$((PORT + 1))
OUT=${OUT:-$(mktemp -d /tmp/sharedrow_ab.XXXXXX)}
mkdir -p "$OUT"
"$A/beast" demo-models --out "$OUT/models" >/dev/null 2>&1
printf '[cache]\nenabled = false\n' > "$OUT/nocache.toml"
SP=
trap '[ -n "$SP" ] && kill $SP 2>/dev/null' EXIT
echo "# $(date -u +%FT%TZ) A=$A B=$B rounds=$ROUNDS secs=$SECS; $(uptime)"
printf '%-5s %-3s %9s %9s %7s %9s %8s %7s %6s\n' round bin kern_r/s srv_r/s ratio out_us srv_us/r achieved load1
for round in $(seq "$ROUNDS"); do
  order="A B"; [ $((round % 2)) = 0 ] && order="B A"
  for who in $order; do
    dir=$A; [ $who = B ] && dir=$B
    load=$(cut -d' ' -f1 /proc/loadavg)
    k=$(taskset -c 0 "$dir/examples/backend_throughput" --secs 2 --batches 64 2>&1)
    echo "$k" >> "$OUT/ab.log"
    kcpu=$(echo "$k" | awk '$1 == "batch" && $2 == 64 {print $8; exit}')
    : > "$OUT/serve.log"
    taskset -c 0 "$dir/beast" serve --models "$OUT/models" --cores 0 --listen 127.0.0.1:$PORT \
      --admin-listen 127.0.0.1:$ADMIN --config "$OUT/nocache.toml" > "$OUT/serve.log" 2>&1 &
    SP=$!
    for _ in $(seq 200); do grep -q listening "$OUT/serve.log" && break; sleep 0.05; done
    t0=$(awk '{print $14 + $15}' /proc/$SP/stat)
    r=$(taskset -c 1 ${BENCH_PREFIX:-} "$BENCH" --server 127.0.0.1:$PORT --admin 127.0.0.1:$ADMIN --cpus 1 --json \
      --target bench_ens --no-cache --closed -c 32 -k 16 --duration "$SECS" --warmup 1 \
      --max-error-fraction 1 2>>"$OUT/ab.log")
    t1=$(awk '{print $14 + $15}' /proc/$SP/stat)
    kill $SP; wait $SP 2>/dev/null; SP=
    echo "$r" >> "$OUT/ab.log"
    python3 - "$r" "$kcpu" $((t1 - t0)) "$(getconf CLK_TCK)" "$SECS" "$round" "$who" "$load" <<'PY'
import json, sys
r, kcpu, ticks, hz, secs, rnd, who, load = sys.argv[1:]
v = [json.loads(l) for l in r.splitlines() if l.startswith("{")][-1]
secs = float(secs); cpu = int(ticks) / int(hz); k = float(kcpu)
# issue10.sh's figure: answers over warm-up + run per server CPU-second
reqs = v["ok"] * (secs + 1) / secs
srv = reqs / cpu if cpu > 0 else float("nan")
print(f'{rnd:<5} {who:<3} {k:9.0f} {srv:9.0f} {srv / k:7.3f} {1e6 / srv - 1e6 / k:9.2f} {1e6 / srv:8.2f} {v["achieved_rps"]:7.0f} {load:>6}')
PY
  done
done
