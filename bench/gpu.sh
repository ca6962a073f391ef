#!/usr/bin/env bash
# The GPU checks in one go, on a machine with CUDA:
#   1. tests/test_cuda.py: the tiny toy pipeline on the GPU, and make_cam / AdvCAM / random walk on the CPU
#      equal to the GPU's outputs;
#   2. the whole toy run on the GPU (its own work_dir and weights, so the CPU run's results stay; ToyVOC
#      and the ToyNet weights are made if missing, as bash_run_sample.sh --toy does);
#   3. bench/make_cam.py --device cuda on ToyVOC's 120 train images (width 16) and on 40 VOC-sized
#      375x500 images with the real ResNet-50 width (64), also with --make_cam_batch 8 (fp32, bf16);
#   4. bench/advcam_speed.py --voc_sized --device cuda: the literal docs/method.md §4.6 loop against make_advcam
#      with 1, 4 and 8 images per batch, float32 and --amp bf16, channels_last;
#   5. bench/scaling.py: make_cam / make_advcam on 1, 2, 4, 8 processes, as many as there are GPUs.
# Logs and the run's report go to $OUT (default result/gpu_check). Extra arguments go to the toy run.
#   bash bench/gpu.sh [--num_workers 8]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEST=${OUT:-result/gpu_check}
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1

nvidia-smi -L
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"

timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$DEST/test_cuda.log"

start=$(date +%s)
PYTHON=$PY bash bash_run_sample.sh --toy --device cuda --work_dir result/toy_cuda \
  --cam_weights_name sess/toy_cuda/res50_cam.pth --wood_weights_name sess/toy_cuda/res50_wood.pth \
  --irn_weights_name sess/toy_cuda/res50_irn.pth "$@" > "$DEST/toy_run.log" 2>&1
echo "toy run on cuda: rc $?, $(( $(date +%s) - start )) s" | tee -a "$DEST/toy_run.log"
grep -E "^== stage|^== step .* done in|mIoU" "$DEST/toy_run.log" | tail -40
cp result/toy_cuda/summary.md result/toy_cuda/summary.json result/toy_cuda/samples.png "$DEST"/ 2>/dev/null

{
  timeout 150 $PY bench/make_cam.py --device cuda --voc12_root Data/ToyVOC --infer_list train --n 120 \
    --width 16 --num_workers 0 4 --repeats 3
  timeout 150 $PY bench/make_cam.py --device cuda --size 375 500 --n 40 --width 64 --num_workers 0 4 --repeats 3
} 2>&1 | tee "$DEST/bench_make_cam.log"
{
  timeout 150 $PY bench/make_cam.py --device cuda --size 375 500 --n 40 --width 64 --num_workers 4 --repeats 3 \
    --make_cam_batch 8 --channels_last
  timeout 150 $PY bench/make_cam.py --device cuda --size 375 500 --n 40 --width 64 --num_workers 4 --repeats 3 \
    --make_cam_batch 8 --channels_last --amp bf16
} 2>&1 | tee -a "$DEST/bench_make_cam.log"

# the literal loop runs ~56 forward+backward passes per class per scale one flip pair at a time: 4 images
timeout 420 $PY bench/advcam_speed.py --voc_sized --device cuda --n 4 --batch 1 4 --amp none bf16 \
  --channels_last 2>&1 | tee "$DEST/bench_advcam_speed.log"

# make_cam / make_advcam on 1, 2, 4, 8 processes (one GPU each), as many as this machine has
NGPU=$(nvidia-smi -L | wc -l)
COUNTS=$(for n in 1 2 4 8; do [ "$n" -le "$NGPU" ] && echo -n "$n "; done)
timeout 420 $PY bench/scaling.py --device cuda --nproc $COUNTS --n 64 --size 375 500 --width 64 --repeats 1 \
  2>&1 | tee "$DEST/bench_scaling.log"
