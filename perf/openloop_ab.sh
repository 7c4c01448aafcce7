#!/usr/bin/env bash
# The lean engine's open loop, two beast-bench builds side by side against
# one server: `beast serve --cores 0` pinned to CPU 0 (demo models, no L2),
# each build pinned to CPU 1, bench_a, 64 distinct inputs (cache hits),
# alternating rounds per rate. Prints one line per run: generator thread
# CPU %, achieved rate, send lag p99, wakes (where the build reports them).
#   OLD=/path/beast-bench NEW=target/release/beast-bench RATES="50000 100000" ROUNDS=3 perf/openloop_ab.sh
set -euo pipefail
OLD=${OLD:?an older beast-bench binary}
NEW=${NEW:-target/release/beast-bench}
RATES=${RATES:-50000 100000}
ROUNDS=${ROUNDS:-3}
work=$(mktemp -d /tmp/beast-openloop.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$work"' EXIT
target/release/beast demo-models --out "$work/models" 2>/dev/null
printf 'admin_listen = "off"\n[cache]\nl2_path = ""\n' > "$work/beast.toml"
taskset -c 0 target/release/beast serve --models "$work/models" --cores 0 \
  --listen 127.0.0.1:7971 --config "$work/beast.toml" 2> "$work/serve.log" &
for _ in $(seq 100); do grep -q listening "$work/serve.log" && break; sleep 0.1; done
echo "- date: $(date -u +%F), commit: $(git rev-parse --short HEAD), machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs (shared)"
echo "- load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| rate | build | round | thread CPU % | achieved req/s | send lag p99 ms | wakes/request |"
echo "|---|---|---|---|---|---|---|"
for rate in $RATES; do
  for r in $(seq "$ROUNDS"); do
    for b in old new; do
      bin=$OLD; [ $b = new ] && bin=$NEW
      j=$(taskset -c 1 "$bin" --server 127.0.0.1:7971 --engine lean --rate "$rate" \
        --target bench_a --distinct 64 --duration 3 --warmup 1 --json --max-error-fraction 1 \
        | grep '^{')
      python3 - "$rate" "$b" "$r" "$j" <<'PY'
import json, sys
rate, b, r, j = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
w = j.get("generator_wakes")
wr = f"{w / max(j['sent'], 1):.2f}" if w is not None else "-"
print(f"| {rate} | {b} | {r} | {j['client_thread_cpu_max_pct']:.0f} | {j['achieved_rps']:.0f} | {j['send_lag_ms']['p99']:.3f} | {wr} |")
PY
    done
  done
done
