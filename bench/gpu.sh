#!/usr/bin/env bash
# The GPU checks and benchmarks, on a machine with CUDA. First the checks (at most 10 minutes):
#   1. tests/test_cuda.py: the tiny toy pipeline on the GPU; make_cam / AdvCAM / random walk on the CPU equal
#      to the GPU's; --deterministic train_irn repeating its weights; one NCCL rank (torchrun) training
#      train_cam, train_wood, train_irn, train_seg and running cam_to_ir_label with 2 loader workers;
#   2. AdvCAM at VOC size: two 500 x 375 images with 4 label classes, full-width ResNet-50, 4 scales,
#      adv_iter 27, --advcam_batch 1 and 4, float32 and bf16: seconds per image and peak memory;
#   3. train_irn at crop 512, batch 32, radius 10, full width, twice with --deterministic true and twice
#      without: weights equal or their largest difference.
# Then, unless the first argument is --checks_only, the benchmarks:
#   4. the whole toy run on the GPU (its own work_dir and weights, so the CPU run's results stay; ToyVOC
#      and the ToyNet weights are made if missing, as bash_run_sample.sh --toy does);
#   5. bench/make_cam.py --device cuda on ToyVOC's 120 train images (width 16) and on 40 VOC-sized
#      375x500 images with the real ResNet-50 width (64), also with --make_cam_batch 8 (fp32, bf16);
#   6. bench/advcam_speed.py --voc_sized --device cuda: the literal docs/method.md §4.6 loop against make_advcam
#      with 1 and 4 images per batch, float32 and --amp bf16, channels_last;
#   7. bench/scaling.py: make_cam / make_advcam on 1, 2, 4, 8 processes, as many as there are GPUs.
# Logs and the run's report go to $OUT (default result/gpu_check). Other arguments go to the toy run.
#   bash bench/gpu.sh --checks_only        bash bench/gpu.sh [--num_workers 8]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEST=${OUT:-result/gpu_check}
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1

nvidia-smi -L
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"

timeout 270 $PY -m pytest -q -s -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$DEST/test_cuda.log" | tail -15

timeout 150 $PY bench/advcam_speed.py --voc_sized --labels 4 --no_literal --device cuda --n 2 --batch 1 4 \
  --amp none bf16 2>&1 | tee "$DEST/advcam_probe.log" | tail -6

timeout 150 $PY bench/irn_determinism.py --device cuda 2>&1 | tee "$DEST/irn_determinism.log"

if [ "${1:-}" = --checks_only ]; then exit 0; fi

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
