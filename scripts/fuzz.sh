#!/usr/bin/env bash
# Fuzz beast's parsers of untrusted input with cargo-fuzz (libFuzzer), each
# target for SECONDS (default 60) of one core, niced; then minimise its
# corpus. Needs a nightly toolchain and `cargo install cargo-fuzz`.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     # default: every target
#
# Targets (bodies in fuzz/src/lib.rs): frame, request, admin_head, model,
# l2_open, onnx. The corpus lives in fuzz/corpus/<target>/ (committed, minimised,
# a few hundred KB at most), crash inputs in fuzz/artifacts/<target>/
# (committed once fixed, as regression inputs). `cargo test --release
# --test fuzz_corpus` replays both on stable. See fuzz/README.md.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(frame request admin_head model l2_open onnx)
# Scratch files of the model and l2_open targets: keep them off the disk.
[ -d /dev/shm ] && export TMPDIR=/dev/shm
crashed=()
for t in "${targets[@]}"; do
  echo "== $t: ${secs}s"
  mkdir -p "corpus/$t" "artifacts/$t"
  start=$(date +%s)
  log=$(mktemp "${TMPDIR:-/tmp}/beast-fuzz-$t.XXXXXX")
  # CPU seconds of the run (user + system, children included) on stderr.
  TIMEFORMAT="== $t: cpu %U s user + %S s system, %R s wall"
  rc=0
  time nice cargo +nightly fuzz run "$t" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    >"$log" 2>&1 || rc=$?
  if [ $rc -ne 0 ]; then
    crashed+=("$t")
    grep -E -A12 "panicked at|ERROR: (libFuzzer|AddressSanitizer)" "$log" | head -n 40 || true
    echo "== $t: CRASH, input in fuzz/artifacts/$t/ (full log: $log)"
  fi
  grep -E "^stat::(number_of_executed_units|peak_rss_mb)|cov: .* (DONE|INITED)" "$log" | tail -n 3 || true
  echo "== $t: fuzzed $(( $(date +%s) - start ))s; minimising the corpus"
  nice cargo +nightly fuzz cmin "$t" 2>&1 | tail -n 2
  echo "== $t: corpus $(ls "corpus/$t" | wc -l) files, $(cat "corpus/$t"/* | wc -c) bytes"
done
if [ ${#crashed[@]} -gt 0 ]; then
  echo "== crashes in: ${crashed[*]}"
  exit 1
fi
