#!/usr/bin/env bash
# Three nodes sharing one L3 (redis-server) against one node, under a Zipf
# stream sent round-robin (as a load balancer spreads requests): hit
# ratio, client-side p50/p99 and throughput, for a tiny MLP (`a`) and a
# 256->1024->1024->16 MLP (`big`). perf/l3.md, "Three nodes, Zipf inputs".
#
#   perf/l3_three_nodes.sh                    # 20000 requests per line
#   L3_ZIPF_REQUESTS=5000 perf/l3_three_nodes.sh
#   L3_BUDGET_US=20000 perf/l3_three_nodes.sh   # lookup_budget_us (default 1000)
#
# The nodes, the client threads (4) and redis-server (started by the test
# on a free loopback port) share the machine: on a 2-core VM the figures
# are ratios between lines of one run, not capacities.
# Needs Debian's redis-server (apt-get install -y redis-server).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "commit $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (dirty)'), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), $(redis-server --version | cut -d' ' -f3)"
cargo test --release --test l3_cluster measure_three_nodes_zipf -- --ignored --nocapture 2>&1 \
    | grep -E '^( *a|big|[0-9]+ requests|SKIP)'
