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
#   OLD=/path/to/an/older/beast perf/hit_vs_redis.sh   # old and new beast and Redis, side by side
#   OLD_TOML='uring_sockets = false' perf/hit_vs_redis.sh   # old = this binary with these config lines
#   CHRT=1 ...                      # servers and generators as SCHED_FIFO 1: on a VM shared with
#                                   # compiling neighbours they otherwise wait for a CPU most of the time
#   CLIENT=hit_load ...             # beast's load from examples/hit_load.rs (epoll, one thread, -P style
#                                   # pipelines, like redis-benchmark) instead of beast-bench; closed loop only
#   CLIENTS="glommio lean hit_load" ...  # one row per client for beast, each against the same Redis
#                                   # figure of that depth: beast-bench --engine glommio, beast-bench
#                                   # --engine lean (its default), examples/hit_load.rs (with OLD: new binary only);
#                                   # "old" is the beast-bench binary OLD_BENCH=/path (e.g. one built before the lean engine)
#   OPEN_LOOP=0 ...                 # closed loop only
#   GEN_THREADS=N ...               # beast-bench --threads N (all on core 1)
# With OLD, the closed-loop table has a row per binary, each measured right
# after the other against the same Redis figure, so "new / old" and
# "beast / Redis" are ratios from one run (read them, not the absolute
# rates, on a shared machine). A beast row whose beast-bench thread ran
# at >= 90% of its core is marked GENERATOR-LIMITED: there the ratio is a
# bound on the generator, not the server.
# Needs Debian's redis-server and redis-tools (apt-get install -y redis-server redis-tools).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${SECS:-5}
CONNS=${CONNS:-50}
command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null \
  || { echo "needs redis-server and redis-benchmark: apt-get install -y redis-server redis-tools" >&2; exit 1; }
[ -n "${NO_BUILD:-}" ] || cargo build --release --bin beast --bin beast-bench --example hit_load >&2
work=$(mktemp -d /tmp/beast-vs-redis.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$work"' EXIT
target/release/beast demo-models --out "$work/models" 2>/dev/null
RT=; [ -n "${CHRT:-}" ] && RT="chrt -f 1"
port=7995
SP=
start_beast() { # binary [extra config lines]
  rm -f "$work/l2.cache"
  printf '%s\n[cache]\nl2_path = "%s"\n' "${2:-}" "$work/l2.cache" > "$work/beast.toml"
  : > "$work/serve.log" # emptied here, not by the background redirection (a race with the grep below)
  $RT taskset -c 0 "$1" serve --models "$work/models" --cores 0 \
    --listen 127.0.0.1:$port --admin-listen off --config "$work/beast.toml" 2> "$work/serve.log" &
  SP=$!
  for _ in $(seq 100); do grep -q listening "$work/serve.log" && break; sleep 0.1; done
}
stop_beast() { kill "$SP" 2>/dev/null; wait "$SP" 2>/dev/null || true; }
start_beast target/release/beast
$RT taskset -c 0 redis-server --port 6395 --save '' --appendonly no > "$work/redis.log" 2>&1 &
RPID=$!
for _ in $(seq 100); do redis-cli -p 6395 ping >/dev/null 2>&1 && break; sleep 0.1; done

echo "# cache hit path vs Redis GET"
echo
echo "- date: $(date -u +%F), commit: $(git rev-parse --short HEAD), machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs"
echo "- load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "- servers on core 0, load generators on core 1, $CONNS connections, ${SECS}s per point${RT:+, all as \`$RT\`}"
[ -z "${OLD_TOML:-}" ] || echo "- old: this binary with \`${OLD_TOML}\` in its config; new: without"
echo "- beast: \`beast serve --cores 0\` on bench_a, 64 distinct rows (all hits); Redis $(redis-server --version | sed -n 's/.*v=\([0-9.]*\).*/\1/p'): GET of a 64-byte value"
echo

bench() { # extra args...; prints the CSV data line
  $RT taskset -c 1 "${BENCH_BIN:-target/release/beast-bench}" --server 127.0.0.1:$port --cpus 1 ${GEN_THREADS:+--threads $GEN_THREADS} ${ENGINE:+--engine $ENGINE} --target bench_a \
    --distinct 64 -c "$CONNS" --duration "$SECS" --warmup 1 --csv --max-error-fraction 0.001 "$@" | sed -n "\$p"
}
CSV_HEADER=$(taskset -c 1 target/release/beast-bench --server 127.0.0.1:$port --cpus 1 --target bench_a \
  --distinct 64 -c 4 --duration 0.5 --warmup 0.2 --rate 1000 --csv | sed -n 1p)
col() { # column-name csv-data-line
  printf '%s\n%s\n' "$CSV_HEADER" "$2" | awk -F, -v name="$1" 'NR==1{for(i=1;i<=NF;i++) if($i==name) c=i; next} {print $c}'
}

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# CPU µs per answer: process CPU ticks over a run / answers (beast: warm-up included, so answers x (d+1)/d).
cpu_us() { awk -v t="$1" -v n="$2" -v hz="$(getconf CLK_TCK)" 'BEGIN { if (n > 0) printf "%.2f", t / hz * 1e6 / n; else print "n/a" }'; }
echo "- beast's client: ${CLIENTS:-${CLIENT:-beast-bench}}; Redis's: redis-benchmark"
echo
echo "| depth | binary | client | beast closed-loop req/s | beast p99 ms | beast CPU µs/answer | beast client busiest thread | Redis GET req/s | Redis p99 ms | Redis CPU µs/answer | beast / Redis (req/s) | Redis / beast (CPU per answer) | new / old, or with CLIENTS this client / the first (req/s; server CPU per answer) |"
echo "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for depth in 1 16; do
  n=$((depth == 1 ? 300000 : 3000000))
  t0=$(ticks $RPID)
  r=$($RT taskset -c 1 redis-benchmark -p 6395 -c "$CONNS" -P "$depth" -t get -d 64 -n $n --csv 2>/dev/null | tail -n 1)
  r_cpu=$(cpu_us $(( $(ticks $RPID) - t0 )) $n)
  # "GET","rps","avg","min","p50","p95","p99","max"
  r_rps=$(echo "$r" | awk -F'","' '{print $2}'); r_p99=$(echo "$r" | awk -F'","' '{print $7}')
  old_rps=
  AB=${OLD:-${OLD_TOML:+target/release/beast}}
  [ -z "${CLIENTS:-}" ] || AB=
  first_rps=
  for who in ${AB:+old} new; do
    if [ "$who" = old ]; then stop_beast; start_beast "$AB" "${OLD_TOML:-}"; fi
    if [ "$who" = new ] && [ -n "$AB" ]; then stop_beast; start_beast target/release/beast; fi
  for client in ${CLIENTS:-${CLIENT:-bench}}; do
    ENGINE=; BENCH_BIN=; case $client in glommio|lean) ENGINE=$client;; old) BENCH_BIN=$OLD_BENCH;; esac
    t0=$(ticks $SP)
    if [ "$client" = hit_load ]; then
      # answers_per_s=N errors=N cpu_pct=N (1 s warm-up, then SECS measured)
      hl=$($RT taskset -c 1 target/release/examples/hit_load 127.0.0.1:$port "$CONNS" "$depth" "$SECS")
      t1=$(ticks $SP)
      kv() { echo "$hl" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
      b_rps=$(kv answers_per_s); b_p99=-; busy=$(kv cpu_pct)
      [ "$(kv errors)" = 0 ] || echo "hit_load: $(kv errors) answers were not cached OK answers" >&2
      lim=false; line=
      b_cpu=$(cpu_us $((t1 - t0)) "$(awk -v r="$b_rps" -v s="$SECS" 'BEGIN { printf "%d", r * (s + 1) }')")
    else
    line=$(bench --closed -k "$depth")
    t1=$(ticks $SP)
    b_rps=$(col achieved_rps "$line"); b_p99=$(col p99_ms "$line")
    b_cpu=$(cpu_us $((t1 - t0)) "$(awk -v ok="$(col ok "$line")" -v s="$SECS" 'BEGIN { printf "%d", ok * (s + 1) / s }')")
    busy=$(col client_thread_cpu_max_pct "$line"); lim=$(col generator_limited "$line")
    fi
    cpu_ratio=$(awk -v a="$r_cpu" -v b="$b_cpu" 'BEGIN{ if (b > 0) printf "%.2f", a / b; else print "n/a" }')
    flag=$(awk -v b="$busy" -v l="$lim" 'BEGIN { if (l == "true" || b >= 90) print " **GENERATOR-LIMITED**" }')
    ratio=$(awk -v a="$b_rps" -v b="$r_rps" 'BEGIN{ if (b > 0) printf "%.2f", a / b; else print "n/a" }')
    vs_old=-
    if [ -n "${CLIENTS:-}" ]; then
      if [ -z "$first_rps" ]; then first_rps=$b_rps; first_cpu=$b_cpu; else
        vs_old=$(awk -v a="$b_rps" -v b="$first_rps" -v c="$b_cpu" -v d="$first_cpu" 'BEGIN{ if (b > 0 && c > 0) printf "%.2f; %.2f", a / b, c / d; else print "n/a" }'); fi
    elif [ "$who" = old ]; then old_rps=$b_rps; old_cpu=$b_cpu; elif [ -n "$old_rps" ]; then
      vs_old=$(awk -v a="$b_rps" -v b="$old_rps" -v c="$b_cpu" -v d="$old_cpu" 'BEGIN{ if (b > 0 && c > 0) printf "%.2f; %.2f", a / b, c / d; else print "n/a" }'); fi
    name=$who; [ "$who" = new ] && name="new ($(git rev-parse --short HEAD))"
    printf '| %s | %s | %s | %.0f | %s | %s | %.0f%%%s | %.0f | %s | %s | %s | %s | %s |\n' "$depth" "$name" "$client" "$b_rps" "$b_p99" "$b_cpu" "$busy" "$flag" "$r_rps" "$r_p99" "$r_cpu" "$ratio" "$cpu_ratio" "$vs_old"
  done
  done
done
[ "${OPEN_LOOP:-1}" = 1 ] && [ "${CLIENT:-}" != hit_load ] && [ -z "${CLIENTS:-}" ] || exit 0
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
echo "Generator note: beast-bench sends pre-encoded frames (id patched per request) since 2026-12-01; one thread offered at most ~200k req/s here before that (perf/scenarios/0-generator-capacity.env);"
echo "a rate it could not keep is not counted as met (generator_limited)."
