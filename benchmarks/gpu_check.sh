#!/usr/bin/env bash
# The one prepared GPU check, sized for one device-tool call of at most 9 minutes (make gpu-check):
#   build         the extension for the local GPU only; ptxas registers/spills per kernel -> ptxas.txt
#   tests         every CUDA test (-m cuda: the GPU parameters of tests/test_cuda.py, whose emulated
#                 twins every test run already checks, and the cuda device parameters elsewhere)
#   bench_1e8x1000  the suite at D = 1e8, d = 1000, fp32, every distribution: the fused ops and
#                 torch (materialised where P fits, else chunked) side by side, interleaved
#   steps         an RBD step against an SGD step (FC-MNIST; ResNet-8, a compartment per tensor; a
#                 synthetic D = 1e8 model, d = 250), and kernel launches per step
#                 (benchmarks/launch_count.py)
#   probe         instruction rates and the SM clock the rooflines assume (benchmarks/gpu_probe.py)
#   bench_1e8x128, bench_1e8x100   the suite at d = 128 and 100
#   (then)        gpu_check.json: commit, device, every stage's result and JSON, the targets
#                 (benchmarks/gpu_summary.py); tables appended to summary.md
# Stages run in this order (most needed first), each under a time cap, so that the whole stays
# within RBD_GPU_CHECK_S seconds (default 540); a stage that fails, is cut short or finds no time
# left is marked in summary.md and makes the exit status 1; the next stage still runs.
# SM clock, temperature and power are sampled every 0.5 s throughout (clocks.csv).
#
#   bash benchmarks/gpu_check.sh [--cpu] [DIR]
#
# --cpu (make gpu-check-cpu, and tests/test_benchmarks.py): the rehearsal without a GPU, with the
# extension as built here: the test modules imported and the CUDA tests collected as the test
# stage selects them (not run), the probe compiled with nvcc (not run), the bench and the steps on
# the CPU at tiny sizes, the summary and the packing.
#
# Results: DIR, else $RBD_RESULTS_DIR, else results/gpu-check (results/gpu-check-cpu with --cpu).
# Where the device tool's $OUT is set, DIR is packed into $OUT/gpu-check.tar.gz, with summary.md and
# gpu_check.json beside it (the tool returns at most 8 files, 2 folders deep). The commit: `git
# rev-parse HEAD` where .git exists, else $RBD_COMMIT (the device tool copies no .git), so run it
# there as
#   RBD_COMMIT=<sha> PYTHONUNBUFFERED=1 bash benchmarks/gpu_check.sh /tmp/gpu-check   (timeout_s 600)
set -uo pipefail
cd "$(dirname "$0")/.."
mode=gpu
if [ "${1:-}" = "--cpu" ]; then
  mode=cpu
  shift
fi
out=${1:-${RBD_RESULTS_DIR:-results/gpu-check$([ $mode = cpu ] && echo -cpu)}}
mkdir -p "$out"
rm -f "$out/stages.tsv"
py=${PYTHON:-python3}
budget=${RBD_GPU_CHECK_S:-540}
reserve=15  # seconds kept for the summary and the packing
start=$SECONDS
summary="$out/summary.md"
commit=$(git rev-parse HEAD 2>/dev/null || echo "${RBD_COMMIT:-unknown}")
export RBD_COMMIT=$commit RBD_GPU_CHECK_MODE=$mode
status=0

note() { echo "$*" | tee -a "$summary"; }

# stage NAME CAP_S CMD...: CMD's output in NAME.log; a row of the summary's stage table and of stages.tsv.
stage() {
  local name=$1 cap=$2
  shift 2
  local avail=$((budget - reserve - (SECONDS - start)))
  ((cap > avail)) && cap=$avail
  if ((cap < 10)); then
    note "| $name | FAILED: not run, no time left | 0 s |"
    printf '%s\tnot run: no time left\t0\t1\n' "$name" >>"$out/stages.tsv"
    status=1
    return 1
  fi
  echo "== $name (at most $cap s)"
  local t=$SECONDS
  timeout --signal=INT --kill-after=10 "$cap" "$@" >"$out/$name.log" 2>&1
  local rc=$? what=passed
  ((rc == 124)) && what="FAILED: cut at $cap s"
  ((rc != 0 && rc != 124)) && what="FAILED (exit $rc)"
  ((rc != 0)) && status=1
  tail -n 12 "$out/$name.log"
  note "| $name | $what | $((SECONDS - t)) s |"
  printf '%s\t%s\t%s\t%s\n' "$name" "$what" "$((SECONDS - t))" "$rc" >>"$out/stages.tsv"
  return $rc
}

{
  echo "# gpu-check ($mode), commit $commit"
  echo
  echo '```'
  date -u
  if [ $mode = gpu ]; then
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit --format=csv
  fi
  "$py" -c "import torch, sys, platform; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, platform.processor())"
  echo '```'
  echo
  echo "| stage | result | time |"
  echo "|---|---|---|"
} 2>&1 | tee "$summary"

if [ $mode = gpu ]; then
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,temperature.gpu,power.draw,utilization.gpu \
    --format=csv -lms 500 >"$out/clocks.csv" 2>&1 &
  sampler=$!
  arch=$("$py" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" 2>/dev/null)
  if [ -z "$arch" ]; then
    note "| gpu | FAILED: torch sees no GPU, nothing run | 0 s |"
    printf 'gpu\ttorch sees no GPU\t0\t1\n' >>"$out/stages.tsv"
    status=1
  elif stage build 240 env TORCH_CUDA_ARCH_LIST="$arch" RBD_CUDA=1 RBD_NVCC_VERBOSE=1 MAX_JOBS="${MAX_JOBS:-16}" \
      "$py" setup.py build_ext --inplace; then
    # ptxas resource usage per kernel (registers, shared memory, spills), for the record.
    grep -E "Compiling entry|Used [0-9]+ registers|spill stores" "$out/build.log" >"$out/ptxas.txt" || true
    # Several workers when pytest-xdist is there: faster, and a crash fails one test, not the run.
    workers=$("$py" -c "import xdist" 2>/dev/null && echo "-n 8" || true)
    # shellcheck disable=SC2086
    stage tests 180 "$py" -m pytest -q -m cuda tests -p no:cacheprovider $workers
    bench() {  # bench d CAP: D = 1e8
      stage "bench_1e8x$1" "$2" "$py" -m benchmarks.ops_bench --device cuda --shapes "100000000x$1" --dtypes float32 \
        --baselines torch torch_chunked --reps 5 --no-memory --out "$out/bench_1e8x$1"
    }
    bench 1000 120
    stage steps 60 "$py" -m benchmarks.launch_count --out "$out"
    stage probe 45 "$py" -m benchmarks.gpu_probe --out "$out"
    bench 128 75
    bench 100 75
  fi
  kill "$sampler" 2>/dev/null
else
  stage tests_collect 60 "$py" -m pytest -q -m cuda tests --collect-only -p no:cacheprovider
  stage bench 90 "$py" -m benchmarks.ops_bench --device cpu --shapes 2000x1000 2000x128 2000x100 \
    --dtypes float32 --baselines torch torch_chunked --threads 1 --reps 1 --chunk-mib 1 --no-memory --out "$out/bench"
  stage steps 90 "$py" -m benchmarks.launch_count --device cpu --tiny --out "$out"
  stage probe 60 "$py" -m benchmarks.gpu_probe --compile-only --out "$out"
fi

"$py" -m benchmarks.gpu_summary "$out" >"$out/gpu_summary.log" 2>&1 || status=1
tail -n 3 "$summary"
echo "gpu-check finished with status $status in $((SECONDS - start)) s" | tee -a "$summary"

if [ -n "${OUT:-}" ] && [ "$OUT" != "$out" ]; then
  tar czf "$OUT/gpu-check.tar.gz" -C "$out" . && cp "$summary" "$out/gpu_check.json" "$OUT/" || status=1
fi
exit $status
