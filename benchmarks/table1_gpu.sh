#!/usr/bin/env bash
# Table 1's FC rows (MNIST, Fashion-MNIST) for every method and 3 seeds, 100 epochs, on a GPU machine:
# MNIST with the released crop (±3) and without crop, Fashion-MNIST with crops ±3, 0, 1 and 2.
# That machine has no network, so carry the data: here, once,
#     python -m rbd_experiments.data pack mnist fmnist --to data      # 40 MiB of verified .gz files
# and carry `data` (and nothing else) with the working tree; there:
#     bash benchmarks/table1_gpu.sh "$OUT"
# Runs train in parallel processes (one CPU thread each, all on the one GPU): RUNS_AT_ONCE (12).
# A repeated call resumes every unfinished run from its checkpoint in the results directory.
# Everything comes back as one file, OUT/table1-runs.tar.gz (runs/*/metrics.{json,csv} and the
# checkpoints): unpack it into docs/table1 here, where `python -m rbd_experiments.reproduce --report ...
# --out docs/table1` tabulates it and the same command without --report continues it.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-results/table1-gpu}}
py=${PYTHON:-python3}
mkdir -p "$out"
export RBD_DATA=${RBD_DATA:-data} PYTHONUNBUFFERED=1

if ! "$py" -c "import rbd_cuda; assert rbd_cuda.backends.built_with_cuda()" 2>/dev/null; then
  arch=$("$py" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')")
  echo "== build (TORCH_CUDA_ARCH_LIST=$arch)"
  TORCH_CUDA_ARCH_LIST=$arch RBD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} "$py" setup.py build_ext --inplace >"$out/build.log" 2>&1 \
    || { tail -40 "$out/build.log"; exit 1; }
fi
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$out/device.txt"
common=(--methods sgd,rbd,fpd,nes --seeds "${SEEDS:-0,1,2}" --epochs "${EPOCHS:-100}" --jobs "${RUNS_AT_ONCE:-12}"
        --device cuda --out "$out")
"$py" -m rbd_experiments.reproduce --rows fc-mnist --crop-pads 3,0 "${common[@]}" 2>&1 | tee "$out/reproduce-mnist.log"
"$py" -m rbd_experiments.reproduce --rows fc-fmnist --crop-pads 3,0,1,2 "${common[@]}" 2>&1 | tee "$out/reproduce-fmnist.log"
tar czf "$out/table1-runs.tar.gz" -C "$out" --exclude=curves.png runs
