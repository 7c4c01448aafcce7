#!/usr/bin/env bash
# Row 2, second round, with the Python asyncio + ONNX Runtime peer (../shared/peers) side by side.
set -uo pipefail
cd /work/main
P=/work/shared/peers
BASE=/work/wt/base/target/release/beast
NEW=$PWD/target/release/beast
BENCH=$PWD/target/release/beast-bench
W=$(mktemp -d /tmp/issue10p.XXXXXX)
echo "peer run $(date -u +%FT%TZ); uptime: $(uptime); onnxruntime $(python3 -c 'import onnxruntime; print(onnxruntime.__version__)')"
python3 $P/build_models.py --out $W/onnx > /dev/null
taskset -c 0 python3 $P/serve_ort.py --model $W/onnx/ensemble.onnx --port 17000 --max-batch 32 > $W/ort.log 2>&1 & OP=$!
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/17000) 2>/dev/null && break; sleep 0.2; done
for r in 8000 16000; do
  echo "==== peer rate $r loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "cmd: taskset -c 1 python3 shared/peers/loadgen.py --port 17000 --rate $r --duration 4 --warmup 1 --drain 2 --server-pid $OP"
  taskset -c 1 python3 $P/loadgen.py --port 17000 --rate $r --duration 4 --warmup 1 --drain 2 --server-pid $OP
done
kill $OP; wait $OP 2>/dev/null
$BASE demo-models --out $W/models >/dev/null 2>&1
printf '[cache]\nenabled = false\n' > $W/beast.toml
for b in base:$BASE new:$NEW; do
  l=${b%%:*}; bin=${b#*:}
  taskset -c 0 $bin serve --models $W/models --cores 0 --listen 127.0.0.1:7996 --admin-listen 127.0.0.1:7997 --config $W/beast.toml > $W/serve.log 2>&1 & SP=$!
  for _ in $(seq 100); do grep -q listening $W/serve.log && break; sleep 0.1; done; sleep 0.3
  echo "==== beast $l loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "cmd: taskset -c 1 beast-bench --server 127.0.0.1:7996 --admin 127.0.0.1:7997 --cpus 1 --target bench_ens --no-cache -c 16 -k 64 --sweep 8000,16000 --duration 4 --warmup 1 --max-error-fraction 1"
  taskset -c 1 $BENCH --server 127.0.0.1:7996 --admin 127.0.0.1:7997 --cpus 1 --target bench_ens --no-cache -c 16 -k 64 --sweep 8000,16000 --duration 4 --warmup 1 --max-error-fraction 1
  kill -TERM $SP; wait $SP 2>/dev/null
done
echo "end $(date -u +%FT%TZ); uptime: $(uptime)"
rm -rf $W
