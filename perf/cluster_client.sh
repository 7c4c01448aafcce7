#!/usr/bin/env bash
# The cluster client, measured (perf/cluster_client.md):
#  1. its overhead against one plain connection: one node, the same
#     closed-loop load through `Client` and through `Cluster` in
#     alternating rounds (examples/cluster_overhead.rs), ratio per round;
#  2. a 3-node run of `beast-bench --server a,b,c` (per-node and total).
# All nodes run `beast serve --cores 0` on the demo models (bench_a, 256 f32
# inputs), no L2 file; the load comes from the same machine.
#
#   perf/cluster_client.sh                 # build, run, print markdown
#   NO_BUILD=1 SECS=3 ROUNDS=3 RATE=3000 perf/cluster_client.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${SECS:-3}
ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-4}
RATE=${RATE:-3000}
[ -n "${NO_BUILD:-}" ] || cargo build --release --bin beast --bin beast-bench --example cluster_overhead >&2
work=$(mktemp -d /tmp/beast-cluster.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$work"' EXIT
target/release/beast demo-models --out "$work/models" 2>/dev/null
printf 'admin_listen = "off"\n[cache]\nl2_path = ""\n' > "$work/beast.toml"
start() { # port
  : > "$work/serve-$1.log"
  target/release/beast serve --models "$work/models" --cores 0 \
    --listen 127.0.0.1:$1 --config "$work/beast.toml" 2> "$work/serve-$1.log" &
  for _ in $(seq 100); do grep -q listening "$work/serve-$1.log" && break; sleep 0.1; done
}
start 7961
echo "# cluster client"
echo
echo "- date: $(date -u +%F), commit: $(git rev-parse --short HEAD), machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs"
echo "- load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "## Overhead against one connection (one node, $THREADS threads closed loop, bench_a, 64 inputs, all cache hits)"
echo
target/release/examples/cluster_overhead 127.0.0.1:7961 "$THREADS" "$SECS" "$ROUNDS" bench_a 256
start 7962
start 7963
echo
echo "## 3 nodes: beast-bench --server a,b,c (open loop $RATE req/s, bench_a, 4096 distinct inputs, cache bypassed)"
echo
echo '```'
target/release/beast-bench --server 127.0.0.1:7961,127.0.0.1:7962,127.0.0.1:7963 \
  --target bench_a --rate "$RATE" --duration "$SECS" --warmup 1 -c 4 -k 16 --no-cache
echo '```'
echo
echo "## 1 node, same load (for comparison)"
echo
echo '```'
target/release/beast-bench --server 127.0.0.1:7961 \
  --target bench_a --rate "$RATE" --duration "$SECS" --warmup 1 -c 4 -k 16 --no-cache
echo '```'
