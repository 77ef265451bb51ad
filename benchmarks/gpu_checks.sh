#!/usr/bin/env bash
# The GPU checks the issues ask for, in one short script (for a lent H100/H200 or any CUDA machine).
#   bash benchmarks/gpu_checks.sh [OUT_DIR]        (OUT_DIR defaults to $OUT, else ./gpu_results)
# Needs torch, timm, numpy, pandas, scikit-learn and opencv (the device image has them) plus this repo on
# PYTHONPATH. The predict benchmark also needs pydicom; where it is missing, carry wheels (see the device
# notes) or it is skipped. Results: one JSON per check and a log.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_results}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MPLBACKEND=Agg
py="${PYTHON:-python3}"
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  echo "== 2D training loop vs model alone vs the original's regime (densenet121, 256 px, batch 256)"
  "$py" benchmarks/train_throughput.py --json "$out/train_throughput.json"
  echo "== the same, torch.compile"
  "$py" benchmarks/train_throughput.py --compile --json "$out/train_throughput_compiled.json"
  ngpu="$(nvidia-smi -L 2>/dev/null | wc -l)"; ngpu="${ngpu:-1}"; [ "$ngpu" -ge 1 ] || ngpu=1
  echo "== DDP: plain loop vs DDP on 1 rank, and scaling to $ngpu GPU(s) (densenet121, 256 px, global batch 64, bf16)"
  "$py" benchmarks/ddp_scaling.py --device cuda --ranks $(seq -s ' ' 1 "$ngpu" | awk '{print $1, $NF}') \
    --json "$out/ddp_scaling.json" || echo "ddp_scaling failed"
  echo "== ichd train under torchrun on the smoke phantom (NCCL, bf16, then fp16 + GradScaler, then compiled)"
  for variant in "cnn.amp_dtype=bf16" "cnn.amp_dtype=fp16" "cnn.compile=true"; do
    "$py" -m torch.distributed.run --standalone --nproc_per_node "$ngpu" -m ichdlib train params/smoke.yaml \
      --set device=cuda --set cnn.amp=true --set "$variant" --set "root=${TMPDIR:-/tmp}/ichd_ddp_smoke_${variant//[.=]/_}" \
      2>&1 | grep -v "it/s\]\|s/it\]" || echo "ichd train ($variant) failed"
  done
  echo "== validation's share of a fold under rsna_gpu.yaml's cadence (measured per-image costs, densenet121 256 px)"
  "$py" benchmarks/val_cadence.py --device cuda --json "$out/val_cadence.json" || echo "val_cadence failed"
  echo "== the same at 512 px (densenet121, batch 64), eager and compiled"
  "$py" benchmarks/train_throughput.py --model densenet121 --size 512 --batch 64 --json "$out/train_throughput_512.json"
  "$py" benchmarks/train_throughput.py --model densenet121 --size 512 --batch 64 --compile \
    --json "$out/train_throughput_512_compiled.json"
  echo "== GPU memory and loop rate of the other two backbones (README sizing table)"
  "$py" benchmarks/train_throughput.py --model densenet169 --json "$out/train_throughput_densenet169.json"
  "$py" benchmarks/train_throughput.py --model seresnext101_32x4d --batch 80 \
    --json "$out/train_throughput_seresnext101.json"
  echo "== 3D CNN member (rsna_gpu.yaml cnn3d: resnet18, 256 px, 16-slice crops, batch 64, bf16): slices/s, memory"
  "$py" benchmarks/cnn3d_throughput.py --device cuda --json "$out/cnn3d_throughput.json" || echo "cnn3d_throughput failed"
  "$py" benchmarks/cnn3d_throughput.py --device cuda --batch 128 --json "$out/cnn3d_throughput_b128.json" \
    || echo "cnn3d_throughput (batch 128) failed"
  echo "== ichd train --stage cnn3d under torchrun on the smoke phantom (NCCL, bf16)"
  "$py" -m torch.distributed.run --standalone --nproc_per_node "$ngpu" -m ichdlib train params/smoke.yaml --stage cnn3d \
    --set device=cuda --set cnn.amp=true --set cnn3d.enabled=true --set "root=${TMPDIR:-/tmp}/ichd_ddp_smoke_cnn3d" \
    2>&1 | grep -v "it/s\]\|s/it\]" || echo "ichd train --stage cnn3d failed"
  echo "== host loading at 512 px from DICOM files, one worker"
  "$py" benchmarks/native_loading.py --json "$out/native_loading.json"
  echo "== tests marked gpu"
  "$py" -m pytest -q -m gpu -p no:cacheprovider tests/test_cnn_phantom.py tests/test_cnn.py || true
  if "$py" -c "import pydicom" 2>/dev/null; then
    echo "== seconds per study (demo architecture, untrained weights)"
    "$py" benchmarks/predict.py --device cuda --json "$out/predict_demo.json"
    echo "== seconds per study (the original's four CNNs x 5 folds, TTA 4)"
    "$py" benchmarks/predict.py --params params/rsna_gpu.yaml --device cuda --json "$out/predict_rsna.json"
  else
    echo "pydicom missing: predict benchmark skipped"
  fi
} 2>&1 | tee "$out/gpu_checks.log"
