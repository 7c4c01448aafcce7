#!/usr/bin/env bash
# Cache hit-ratio dip after a new version of a model takes over, with and
# without pre-warming (docs/MODELS.md "Shadow, canary, promote, roll back").
#   with:    v2 runs as a shadow (fraction $FRAC) for the 4 s before the
#            switch, so its answers to the sampled (popular) inputs are cached
#            under its own key; at $AT s it is promoted
#            (POST /v1/models/M/promote).
#   without: a plain reload at $AT s: v2 becomes current with nothing cached.
# The hit ratio (L1 hits / lookups over each interval) is polled from
# /metrics every 100 ms; the summary gives the ratio before the switch,
# the lowest 100 ms after it, and the time until it is back within 5
# points of the before figure.
# Also: the misses in the 2 s after the switch against the 2 s before.
# Usage: perf/rollout_hit_dip.sh [RATE] [SECONDS] [FRAC] [AT]   (release build first)
# One shard on CPU 0, the generator on CPU 1 (a 2-core machine: shared).
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${1:-2000}
SECS=${2:-12}
FRAC=${3:-0.25}
AT=${4:-10}
M=digits_medium
B=target/release
W=$(mktemp -d)
SERVER=
trap 'if [ -n "$SERVER" ]; then kill $SERVER 2>/dev/null || true; fi; rm -rf "$W"' EXIT
ADMIN=127.0.0.1:19465
PORT=127.0.0.1:17879

poll() { # $1: output CSV, $2: seconds
  python3 - "$ADMIN" "$1" "$2" <<'PY'
import sys, time, urllib.request
admin, out, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
def read():
    body = urllib.request.urlopen(f"http://{admin}/metrics", timeout=2).read().decode()
    h = m = 0.0
    for line in body.splitlines():
        if line.startswith('beast_cache_hits_total{tier="l1"}'):
            h = float(line.split()[-1])
        elif line.startswith("beast_cache_misses_total "):
            m = float(line.split()[-1])
    return h, m
t0 = time.monotonic()
with open(out, "w") as f:
    f.write("t_s,l1_hits,misses\n")
    nxt = t0
    while time.monotonic() - t0 < secs:
        h, m = read()
        f.write(f"{time.monotonic() - t0:.3f},{h:.0f},{m:.0f}\n")
        nxt += 0.1
        time.sleep(max(0.0, nxt - time.monotonic()))
PY
}

summary() { # $1: CSV, $2: switch time (s since the poll began)
  python3 - "$1" "$2" <<'PY'
import sys, csv
rows = [tuple(map(float, r.values())) for r in csv.DictReader(open(sys.argv[1]))]
sw = float(sys.argv[2])
iv = []
for (t0, h0, m0), (t1, h1, m1) in zip(rows, rows[1:]):
    n = (h1 - h0) + (m1 - m0)
    if n > 0:
        iv.append((t1, (h1 - h0) / n))
before = [r for t, r in iv if sw - 1.5 <= t < sw]
after = [(t, r) for t, r in iv if t >= sw]
b = sum(before) / max(len(before), 1)
low_t, low = min(after, key=lambda x: x[1])
back = next((t for t, r in after if t > low_t and r >= b - 0.05), None)
rec = f"{back - sw:.1f} s" if back is not None else "not within the run"
def misses(a, z):
    inside = [(t, m) for t, h, m in rows if a <= t <= z]
    return inside[-1][1] - inside[0][1]
print(f"hit ratio before {b:.3f}, lowest 100 ms after the switch {low:.3f} "
      f"(at +{low_t - sw:.1f} s), back within 5 points after {rec}; "
      f"misses 2 s before {misses(sw - 2, sw):.0f}, 2 s after {misses(sw, sw + 2):.0f}")
print("ratio per 100 ms from -0.5 s:", " ".join(f"{r:.2f}" for t, r in iv if sw - 0.5 <= t <= sw + 2.0))
PY
}

run() { # $1: with | without
  rm -rf "$W/repo"
  mkdir -p "$W/repo"
  cp -r models/$M "$W/repo/"
  printf 'admin_listen = "%s"\n[cache]\nl2_path = ""\n' "$ADMIN" > "$W/beast.toml"
  $B/beast serve --models "$W/repo" --listen $PORT --cores 0 --config "$W/beast.toml" 2> "$W/serve-$1.log" &
  SERVER=$!
  until curl -sf "http://$ADMIN/readyz" >/dev/null 2>&1; do sleep 0.1; done
  $B/beast-bench --server $PORT --target $M --width 64 --distinct 20000 --zipf 1.1 \
    --rate "$RATE" --duration "$SECS" --warmup 1 --connections 8 --cpus 1 --json \
    > "$W/bench-$1.json" &
  BENCH=$!
  poll "$W/hits-$1.csv" "$((SECS + 1))" &
  POLL=$!
  P0=$(date +%s%N)
  sleep $((AT - 4))
  if [ "$1" = with ]; then
    cp -r "$W/repo/$M/1" "$W/repo/$M/.tmp-2" && mv "$W/repo/$M/.tmp-2" "$W/repo/$M/2"
    printf 'mode = "shadow"\nfraction = %s\ncandidate = 2\n' "$FRAC" > "$W/repo/$M/rollout.toml"
    curl -s -X POST "http://$ADMIN/v1/repository/reload" > /dev/null
    sleep 4
    SW=$(date +%s%N)
    curl -s -X POST "http://$ADMIN/v1/models/$M/promote" > "$W/switch-$1.json"
  else
    sleep 4
    cp -r "$W/repo/$M/1" "$W/repo/$M/.tmp-2" && mv "$W/repo/$M/.tmp-2" "$W/repo/$M/2"
    SW=$(date +%s%N)
    curl -s -X POST "http://$ADMIN/v1/repository/reload" > "$W/switch-$1.json"
  fi
  wait $BENCH || true
  wait $POLL
  kill $SERVER; wait $SERVER 2>/dev/null || true; SERVER=
  echo "== $1 pre-warm (rate $RATE/s, Zipf 1.1 over 20000 inputs, shadow fraction $FRAC)"
  echo "switch answer: $(head -c 300 "$W/switch-$1.json")"
  python3 - "$W/bench-$1.json" <<'PY'
import json, sys
d = json.loads(open(sys.argv[1]).read().splitlines()[-1])
flat = {}
def walk(p, v):
    if isinstance(v, dict):
        for k, x in v.items():
            walk(f"{p}.{k}" if p else k, x)
    else:
        flat[p] = v
walk("", d)
keep = {k: v for k, v in flat.items() if k in ("achieved_rps", "ok", "error_count", "unanswered") or k.endswith("p50") or k.endswith("p99")}
print("bench:", keep)
PY
  summary "$W/hits-$1.csv" "$(python3 -c "print(($SW - $P0) / 1e9)")"
}

run without
run with
