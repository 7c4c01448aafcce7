#!/usr/bin/env bash
# Builds the CUDA test binary (tests/cuda.rs), the throughput example, and
# `beast` + `beast-bench` with `--features cuda`, strips them and copies them
# into .devbin/ (git-ignored), for perf/cuda_device_check.sh,
# perf/cuda_server_check.sh and perf/cuda_async_check.sh on a GPU machine
# that has no Rust toolchain.
# The binaries load libcuda/libnvrtc/libcublas at run time, so they build here
# without any CUDA toolkit.
#
#   scripts/build-devbin.sh          # then: ls -la .devbin/
set -euo pipefail
cd "$(dirname "$0")/.."
out=.devbin
mkdir -p "$out"

echo "building tests/cuda.rs (release, --features cuda)..." >&2
test_bin=$(cargo test --release --features cuda --test cuda --no-run --message-format=json 2>/dev/null \
  | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") \
            and m["target"]["name"] == "cuda" and "test" in m["target"]["kind"]:
        print(m["executable"])
' | tail -n 1)
if [ -z "$test_bin" ] || [ ! -x "$test_bin" ]; then
  echo "could not find the test executable (run: cargo test --release --features cuda --test cuda --no-run)" >&2
  exit 1
fi

echo "building examples/cuda_throughput.rs..." >&2
cargo build --release --features cuda --example cuda_throughput >&2

echo "building beast and beast-bench (--features cuda)..." >&2
cargo build --release --features cuda --bin beast --bin beast-bench >&2

cp "$test_bin" "$out/cuda_test"
cp target/release/examples/cuda_throughput "$out/cuda_throughput"
cp target/release/beast target/release/beast-bench "$out/"
strip "$out/cuda_test" "$out/cuda_throughput" "$out/beast" "$out/beast-bench"
chmod +x "$out/cuda_test" "$out/cuda_throughput" "$out/beast" "$out/beast-bench"
git rev-parse --short HEAD > "$out/COMMIT" 2>/dev/null || true
ls -la "$out" >&2
du -ch "$out"/cuda_* "$out"/beast* | tail -n 1 >&2
