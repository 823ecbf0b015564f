#!/usr/bin/env bash
# One prepared GPU check: build the extension for the local GPU, run the CUDA tests,
# then the benchmark suite's GPU grid (benchmarks/ops_bench.py --preset gpu: fused project/expand/
# RBD step against torch materialised and chunked, and CuPy cuRAND + cuBLAS when CuPy is installed).
# Results (logs, JSON, markdown) go to the directory given as $1, else $RBD_RESULTS_DIR,
# else $OUT (the device tool's folder), else results/gpu-check.
# Sized for a fresh GPU machine (torch with CUDA, nvcc, 16 cores, no network). Not yet run with the
# suite: its GPU grid (60 cases) is estimated at about 5 minutes on an H200 after the build and the
# tests; see BENCH_ARGS below to run less.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${RBD_RESULTS_DIR:-${OUT:-results/gpu-check}}}
mkdir -p "$out"
py=${PYTHON:-python3}
status=0

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
  "$py" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$out/env.txt"

arch=$("$py" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')") || exit 1
echo "== build (TORCH_CUDA_ARCH_LIST=$arch)"
start=$SECONDS
if ! TORCH_CUDA_ARCH_LIST=$arch RBD_CUDA=1 RBD_NVCC_VERBOSE=1 MAX_JOBS=${MAX_JOBS:-16} \
    "$py" setup.py build_ext --inplace >"$out/build.log" 2>&1; then
  tail -40 "$out/build.log"
  echo "BUILD FAILED"
  exit 1
fi
echo "built in $((SECONDS - start)) s"
# ptxas resource usage per kernel (registers, shared memory, spills), for the record.
grep -E "Compiling entry|Used [0-9]+ registers|spill stores" "$out/build.log" > "$out/ptxas.txt" || true

echo "== CUDA tests"
# Several workers when pytest-xdist is there: faster, and a crash fails one test, not the run.
workers=$("$py" -c "import xdist" 2>/dev/null && echo "-n 4" || true)
"$py" -m pytest -q -m cuda tests -p no:cacheprovider $workers 2>&1 | tee "$out/tests.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== benchmark"
# BENCH_ARGS narrows the grid when device time is short, e.g. BENCH_ARGS="--preset gpu --dtypes float32"
# or BENCH_ARGS="--shapes 1000000x256 100000000x1000".
# shellcheck disable=SC2086
"$py" -m benchmarks.ops_bench --device cuda ${BENCH_ARGS:---preset gpu --dtypes float32 bfloat16} --out "$out" \
  2>&1 | tee "$out/bench.log" | tail -60
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "gpu-check finished with status $status; results in $out"
exit $status
