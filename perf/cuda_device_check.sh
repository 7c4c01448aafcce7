#!/usr/bin/env bash
# Runs the CUDA backend's tests and throughput example on a GPU machine with
# no Rust toolchain, from the prebuilt binaries in .devbin/ (make them first,
# on the build machine: scripts/build-devbin.sh). Everything goes to stdout.
# Finishes well under 4 minutes (each step has its own timeout).
# The throughput example also prints `gemm_only batch <rows> ...` lines: the
# cuBLAS-only FP16 GEMM reference on the same shapes and the backend's share
# of it. The issue-#10 figures (batch-1 server time, batch-1024 share, one
# shard's highest rate at p99 < 2 ms) are perf/cuda_async_check.sh's.
#
#   bash perf/cuda_device_check.sh [devbin-dir]
set -uo pipefail
cd "$(dirname "$0")/.."
bin=${1:-.devbin}
rc=0

echo "== commit: $(cat "$bin/COMMIT" 2>/dev/null || echo unknown)"
echo "== nvidia-smi"
nvidia-smi 2>&1 || echo "nvidia-smi failed"

# Find the CUDA libraries: libcuda.so.1 (driver), libnvrtc.so*, libcublas.so*.
echo "== locating CUDA libraries"
dirs=()
add_dir_of() { # add the folder of the first file matching $1 in $2...
  local pat=$1; shift
  local d f
  for d in "$@"; do
    for f in "$d"/$pat; do
      if [ -e "$f" ]; then dirs+=("$(dirname "$f")"); return 0; fi
    done
  done
  return 1
}
ldc=$(ldconfig -p 2>/dev/null || true)
for lib in libcuda.so.1 libnvrtc.so libcublas.so; do
  p=$(printf '%s\n' "$ldc" | awk -v l="$lib" '$1 ~ "^"l {print $NF; exit}')
  [ -n "$p" ] && dirs+=("$(dirname "$p")")
done
cands=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-*/lib64
       /usr/lib/x86_64-linux-gnu /usr/local/nvidia/lib64 /usr/lib64)
pyn=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__file__))' 2>/dev/null || true)
if [ -z "$pyn" ]; then
  pyn=$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])' 2>/dev/null || true)
fi
if [ -n "$pyn" ]; then
  echo "python nvidia packages: $pyn"
  for d in "$pyn"/*/lib "$pyn"/cu*/lib; do [ -d "$d" ] && cands+=("$d"); done
fi
add_dir_of 'libnvrtc.so*' "${cands[@]}" || echo "libnvrtc not found in ${cands[*]}"
add_dir_of 'libcublas.so*' "${cands[@]}" || echo "libcublas not found in ${cands[*]}"
add_dir_of 'libcuda.so*' "${cands[@]}" || true
uniq_dirs=$(printf '%s\n' "${dirs[@]}" | awk 'NF && !seen[$0]++' | paste -sd: -)
export LD_LIBRARY_PATH="${uniq_dirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
for d in ${uniq_dirs//:/ }; do
  ls "$d" 2>/dev/null | grep -E '^lib(cuda|nvrtc|cublas)\.so' | sed "s|^|  $d/|"
done

echo "== tests/cuda.rs"
if [ -x "$bin/cuda_test" ]; then
  timeout 150 "$bin/cuda_test" --include-ignored --nocapture --test-threads=3
  r=$?; echo "cuda_test exit $r"; [ $r -ne 0 ] && rc=1
else
  echo "missing $bin/cuda_test (run scripts/build-devbin.sh on the build machine)"; rc=1
fi

echo "== examples/cuda_throughput.rs"
if [ -x "$bin/cuda_throughput" ]; then
  timeout 80 "$bin/cuda_throughput" --secs 0.9
  r=$?; echo "cuda_throughput exit $r"; [ $r -ne 0 ] && rc=1
else
  echo "missing $bin/cuda_throughput"; rc=1
fi
echo "== done (rc $rc)"
exit $rc
