#!/usr/bin/env bash
# The cache hit path against Redis GET on the same machine, side by side.
#
# Both servers run on core 0, both load generators on core 1, at the same
# connection count and pipeline depth (in-flight requests per connection):
#   - closed loop (each connection keeps DEPTH requests outstanding): the
#     most each server answers per second -> ratio beast / Redis;
#   - open loop (beast-bench, coordinated-omission corrected): the highest
#     offered rate whose p99 stays under the SLO (1 ms at depth 1, 5 ms at
#     depth 16), from a sweep of rates.
# beast answers `bench_a` (256 f32 inputs -> 16-float output) from its cache:
# 64 distinct input rows, warmed before measuring, so every answer is a hit.
# Redis answers GET of a 64-byte value (16 floats).
#
#   perf/hit_vs_redis.sh            # build, run, print the tables
#   NO_BUILD=1 SECS=3 perf/hit_vs_redis.sh
# Needs Debian's redis-server and redis-tools (apt-get install -y redis-server redis-tools).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${SECS:-5}
CONNS=${CONNS:-50}
command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null \
  || { echo "needs redis-server and redis-benchmark: apt-get install -y redis-server redis-tools" >&2; exit 1; }
[ -n "${NO_BUILD:-}" ] || cargo build --release --bin beast --bin beast-bench >&2
work=$(mktemp -d /tmp/beast-vs-redis.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$work"' EXIT
target/release/beast demo-models --out "$work/models" 2>/dev/null
printf '[cache]\nl2_path = "%s"\n' "$work/l2.cache" > "$work/beast.toml"
port=7995
taskset -c 0 target/release/beast serve --models "$work/models" --cores 0 \
  --listen 127.0.0.1:$port --admin-listen off --config "$work/beast.toml" 2> "$work/serve.log" &
for _ in $(seq 100); do grep -q listening "$work/serve.log" && break; sleep 0.1; done
taskset -c 0 redis-server --port 6395 --save '' --appendonly no > "$work/redis.log" 2>&1 &
for _ in $(seq 100); do redis-cli -p 6395 ping >/dev/null 2>&1 && break; sleep 0.1; done

echo "# cache hit path vs Redis GET"
echo
echo "- date: $(date -u +%F), commit: $(git rev-parse --short HEAD), machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs"
echo "- load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "- servers on core 0, load generators on core 1, $CONNS connections, ${SECS}s per point"
echo "- beast: \`beast serve --cores 0\` on bench_a, 64 distinct rows (all hits); Redis $(redis-server --version | sed -n 's/.*v=\([0-9.]*\).*/\1/p'): GET of a 64-byte value"
echo

bench() { # extra args...; prints the CSV data line
  taskset -c 1 target/release/beast-bench --server 127.0.0.1:$port --cpus 1 --target bench_a \
    --distinct 64 -c "$CONNS" --duration "$SECS" --warmup 1 --csv --max-error-fraction 0.001 "$@" | sed -n "\$p"
}
CSV_HEADER=$(taskset -c 1 target/release/beast-bench --server 127.0.0.1:$port --cpus 1 --target bench_a \
  --distinct 64 -c 4 --duration 0.5 --warmup 0.2 --rate 1000 --csv | sed -n 1p)
col() { # column-name csv-data-line
  printf '%s\n%s\n' "$CSV_HEADER" "$2" | awk -F, -v name="$1" 'NR==1{for(i=1;i<=NF;i++) if($i==name) c=i; next} {print $c}'
}

echo "| depth | beast closed-loop req/s | beast p99 ms | Redis GET req/s | Redis p99 ms | beast / Redis |"
echo "|---:|---:|---:|---:|---:|---:|"
for depth in 1 16; do
  line=$(bench --closed -k "$depth")
  b_rps=$(col achieved_rps "$line"); b_p99=$(col p99_ms "$line")
  r=$(taskset -c 1 redis-benchmark -p 6395 -c "$CONNS" -P "$depth" -t get -d 64 -n $((depth == 1 ? 300000 : 3000000)) --csv 2>/dev/null | tail -n 1)
  # "GET","rps","avg","min","p50","p95","p99","max"
  r_rps=$(echo "$r" | awk -F'","' '{print $2}'); r_p99=$(echo "$r" | awk -F'","' '{print $7}')
  ratio=$(awk -v a="$b_rps" -v b="$r_rps" 'BEGIN{ if (b > 0) printf "%.2f", a / b; else print "n/a" }')
  printf '| %s | %.0f | %s | %.0f | %s | %s |\n' "$depth" "$b_rps" "$b_p99" "$r_rps" "$r_p99" "$ratio"
done
echo
echo "Open loop (beast-bench, corrected latency): highest offered rate meeting the p99 SLO"
echo
echo "| depth | SLO p99 | rates tried | highest rate meeting it | p99 there (ms) |"
echo "|---:|---:|---|---:|---:|"
for spec in "1 1 25000,50000,75000,100000,150000" "16 5 100000,150000,200000,300000,400000,500000"; do
  set -- $spec; depth=$1; slo=$2; rates=$3
  best=none; best_p99=-
  for rate in ${rates//,/ }; do
    line=$(bench --rate "$rate" -k "$depth" || true)
    [ -n "$line" ] || continue
    p99=$(col p99_ms "$line"); ach=$(col achieved_rps "$line"); lim=$(col generator_limited "$line")
    ok=$(awk -v p="$p99" -v s="$slo" -v a="$ach" -v r="$rate" -v l="$lim" 'BEGIN{ print (p <= s && a >= 0.95 * r && l != "true") ? 1 : 0 }')
    [ "$ok" = 1 ] && { best=$rate; best_p99=$p99; }
  done
  echo "| $depth | $slo ms | $rates | $best | $best_p99 |"
done
echo
echo "Generator note: one beast-bench thread offers at most ~200k req/s here (perf/scenarios/0-generator-capacity.env);"
echo "a rate it could not keep is not counted as met (generator_limited)."
