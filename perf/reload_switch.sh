#!/usr/bin/env bash
# Trigger → first answer from the new version, and p99 while the registry
# switches, under beast-bench load (docs/MODELS.md "Lifecycle").
# Usage: perf/reload_switch.sh [RATE] [SECONDS] [--no-cache]   (release build first)
# One shard on CPU 0, the generator on CPU 1: on a 2-core machine the two
# share the box with whatever else runs (note it with the figures).
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${1:-2000}
SECS=${2:-10}
EXTRA=${3:-}   # e.g. --no-cache
B=target/release
W=$(mktemp -d)
trap 'kill $SERVER 2>/dev/null || true; rm -rf "$W"' EXIT
cp -r models "$W/repo"
ADMIN=127.0.0.1:19464
PORT=127.0.0.1:17878
printf 'admin_listen = "%s"\n[cache]\nl2_path = ""\n' "$ADMIN" > "$W/beast.toml"
$B/beast serve --models "$W/repo" --listen $PORT --cores 0 --config "$W/beast.toml" 2> "$W/serve.log" &
SERVER=$!
until curl -sf "http://$ADMIN/readyz" >/dev/null 2>&1; do sleep 0.1; done
bench() {
  $B/beast-bench --server $PORT --target digits --width 64 \
    --input-file models/digits_holdout.csv --drop-last-column --zipf 1.1 \
    --rate "$RATE" --duration "$SECS" --warmup 1 --connections 8 --cpus 1 --json $EXTRA
}
echo "== steady state (rate $RATE/s, $SECS s)"
bench | tee "$W/steady.json"
echo "== switch: at ~3 s into the measured run, new versions of every digits member and a new ensemble (digits_pair)"
bench > "$W/switch.json" &
BENCH=$!
sleep 4
for m in digits_small digits_medium digits_large; do
  cp -r "$W/repo/$m/1" "$W/repo/$m/.tmp-2" && mv "$W/repo/$m/.tmp-2" "$W/repo/$m/2"
done
printf '\n[ensembles.digits_pair]\nmembers = ["digits_small", "digits_medium"]\ncombiner = "mean"\n' >> "$W/repo/ensembles.toml"
T0=$(date +%s%N)
curl -s -X POST "http://$ADMIN/v1/repository/reload" > "$W/reload.json"
T1=$(date +%s%N)
$B/beast predict --server $PORT --target digits --input "$(head -2 models/digits_holdout.csv | tail -1 | cut -d, -f1-64)" > "$W/predict.txt"
T2=$(date +%s%N)
wait $BENCH
cat "$W/switch.json"
echo "== reload answer: $(cat "$W/reload.json")"
echo "== first answer after the trigger: $(grep models: "$W/predict.txt")"
echo "trigger → reload answered (every shard serving): $(( (T1 - T0) / 1000 )) us"
echo "trigger → first answer from the new versions (incl. beast predict process start): $(( (T2 - T0) / 1000 )) us"
grep -E "generation|refused" "$W/serve.log" || true
