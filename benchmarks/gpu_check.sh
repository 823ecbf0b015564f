#!/usr/bin/env bash
# The one prepared GPU check, sized for one device-tool call (about 10 minutes):
#   build     the extension for the local GPU; ptxas registers/spills per kernel -> ptxas.txt
#   tests_v1  every CUDA test (-m cuda) with the v1 kernels (the default)
#   tests_v2  the same with RBD_CUDA_KERNELS=v2 (new kernels, one-launch grouped ops)
#   probe     instruction rates and the SM clock the rooflines assume (benchmarks/gpu_probe.py)
#   launches  kernel launches and step time of one ResNet-8 step with a compartment per tensor:
#             RBD and the grouped ops with v1 and v2, SGD for scale (benchmarks/launch_count.py)
#   bench_*   the suite at D = 1e8 (d = 1000, 128, 100), fp32, all distributions: fused v1, fused
#             v2 and torch (materialised where P fits, else chunked) side by side, interleaved
# Every stage runs under a time cap so that the whole stays within RBD_GPU_CHECK_S seconds
# (default 540); a stage cut short or failed is marked in summary.md and the next one still runs.
# SM clock, temperature and power are sampled every 0.5 s throughout (clocks.csv).
#
# Results: DIR = $1, else $RBD_RESULTS_DIR, else results/gpu-check. Where the device tool's $OUT is
# set, DIR is also packed into $OUT/gpu-check.tar.gz with summary.md beside it (the tool returns at
# most 8 files). The commit: `git rev-parse HEAD` where .git exists, else $RBD_COMMIT (the device
# tool copies no .git), so run it there as
#   RBD_COMMIT=<sha> bash benchmarks/gpu_check.sh /tmp/gpu-check
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${RBD_RESULTS_DIR:-results/gpu-check}}
mkdir -p "$out"
py=${PYTHON:-python3}
budget=${RBD_GPU_CHECK_S:-540}
reserve=15  # seconds kept for the summary and the packing
start=$SECONDS
summary="$out/summary.md"
commit=$(git rev-parse HEAD 2>/dev/null || echo "${RBD_COMMIT:-unknown}")
status=0

note() { echo "$*" | tee -a "$summary"; }

# stage NAME CAP_S CMD...: CMD's output in NAME.log; a row of the summary's stage table.
stage() {
  local name=$1 cap=$2
  shift 2
  local avail=$((budget - reserve - (SECONDS - start)))
  ((cap > avail)) && cap=$avail
  if ((cap < 10)); then
    note "| $name | not run: no time left | 0 s |"
    status=1
    return 1
  fi
  echo "== $name (at most $cap s)"
  local t=$SECONDS
  timeout --signal=INT --kill-after=10 "$cap" "$@" >"$out/$name.log" 2>&1
  local rc=$? what=passed
  ((rc == 124)) && what="cut at $cap s"
  ((rc != 0 && rc != 124)) && what="failed (exit $rc)"
  ((rc != 0)) && status=1
  tail -n 12 "$out/$name.log"
  note "| $name | $what | $((SECONDS - t)) s |"
  return $rc
}

{
  echo "# gpu-check, commit $commit"
  echo
  echo '```'
  date -u
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit --format=csv
  "$py" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo '```'
  echo
  echo "| stage | result | time |"
  echo "|---|---|---|"
} 2>&1 | tee "$summary"

nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,temperature.gpu,power.draw,utilization.gpu \
  --format=csv -lms 500 >"$out/clocks.csv" 2>&1 &
sampler=$!

arch=$("$py" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" 2>/dev/null)
[ -n "$arch" ] || { note "| gpu | torch sees no GPU: nothing run | 0 s |"; kill "$sampler" 2>/dev/null; exit 1; }
if stage build 300 env TORCH_CUDA_ARCH_LIST="$arch" RBD_CUDA=1 RBD_NVCC_VERBOSE=1 MAX_JOBS="${MAX_JOBS:-16}" \
    "$py" setup.py build_ext --inplace; then
  # ptxas resource usage per kernel (registers, shared memory, spills), for the record.
  grep -E "Compiling entry|Used [0-9]+ registers|spill stores" "$out/build.log" >"$out/ptxas.txt" || true
  # Several workers when pytest-xdist is there: faster, and a crash fails one test, not the run.
  workers=$("$py" -c "import xdist" 2>/dev/null && echo "-n 8" || true)
  for k in v1 v2; do
    # shellcheck disable=SC2086
    stage "tests_$k" 130 env RBD_CUDA_KERNELS=$k "$py" -m pytest -q -m cuda tests -p no:cacheprovider $workers
  done
  stage probe 60 "$py" -m benchmarks.gpu_probe --out "$out"
  stage launches 60 "$py" -m benchmarks.launch_count --out "$out"
  for shape in 100000000x1000 100000000x128 100000000x100; do
    stage "bench_$shape" 120 "$py" -m benchmarks.ops_bench --device cuda --shapes "$shape" --dtypes float32 \
      --baselines fused_v2 torch torch_chunked --reps 5 --no-memory --out "$out/bench_$shape"
  done
fi

kill "$sampler" 2>/dev/null
{
  echo
  for f in "$out/gpu_probe.json" "$out/launch_count.md" "$out"/bench_*/ops_bench.md; do
    [ -f "$f" ] || continue
    echo "## ${f#"$out"/}"
    echo
    [[ $f == *.json ]] && echo '```'
    cat "$f"
    [[ $f == *.json ]] && echo '```'
    echo
  done
  echo "SM clock during the run (MHz, min / median / max of the samples):"
  awk -F', ' 'NR > 1 && $2 ~ /MHz/ {split($2, a, " "); print a[1]}' "$out/clocks.csv" | sort -n |
    awk '{v[NR] = $1} END {if (NR) print v[1] " / " v[int((NR + 1) / 2)] " / " v[NR]}'
  echo
  echo "gpu-check finished with status $status in $((SECONDS - start)) s"
} >>"$summary"
tail -n 5 "$summary"

if [ -n "${OUT:-}" ] && [ "$OUT" != "$out" ]; then
  tar czf "$OUT/gpu-check.tar.gz" -C "$out" . && cp "$summary" "$OUT/summary.md"
fi
exit $status
