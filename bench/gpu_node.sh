#!/usr/bin/env bash
# The GPU-node checks in at most 10 minutes, on a machine with CUDA (bench/gpu.sh is the longer benchmark run):
#   1. tests/test_cuda.py: the tiny toy pipeline on the GPU; make_cam / AdvCAM / random walk on the CPU equal
#      to the GPU's; --deterministic train_irn repeating its weights; one NCCL rank (torchrun) training
#      train_cam, train_wood, train_irn, train_seg and running cam_to_ir_label with 2 loader workers;
#   2. AdvCAM at VOC size: two 500 x 375 images with 4 label classes, full-width ResNet-50, 4 scales, adv_iter 27,
#      --advcam_batch 1 and 4, float32 and bf16: seconds per image and peak memory;
#   3. train_irn at crop 512, batch 32, radius 10, full width, twice with --deterministic true and twice
#      without: weights equal or their largest difference.
# Logs go to $OUT (default result/gpu_node).   bash bench/gpu_node.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEST=${OUT:-result/gpu_node}
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1

nvidia-smi -L | tee "$DEST/device.log"
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee -a "$DEST/device.log"

timeout 270 $PY -m pytest -q -s -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$DEST/test_cuda.log" | tail -15

timeout 150 $PY bench/advcam_speed.py --voc_sized --labels 4 --no_literal --device cuda --n 2 --batch 1 4 \
  --amp none bf16 2>&1 | tee "$DEST/advcam_probe.log" | tail -6

timeout 150 $PY bench/irn_determinism.py --device cuda 2>&1 | tee "$DEST/irn_determinism.log"
