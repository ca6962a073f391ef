#!/usr/bin/env bash
# The W-OoD pipeline end to end (docs/method.md §6).
#
#   bash bash_run_sample.sh --toy            # ToyVOC on a CPU: generates the data if missing
#   bash bash_run_sample.sh                  # the paper's configuration on real VOC 2012
#   bash bash_run_sample.sh --toy --train_cam_pass false --device cpu    # extra flags go to every stage
#   bash bash_run_sample.sh --nproc 4        # every step on 4 processes (torchrun: one GPU each; CPU: gloo)
#
# Every stage is one call of run_sample.py; every step resumes (finished outputs are skipped), so the
# same command continues an interrupted run. Results: <work_dir>/summary.json, summary.md, samples.png.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}

PRESET=paper
NPROC=1
while [ $# -gt 0 ]; do
  case "$1" in
    --toy) PRESET=toy; shift ;;
    --nproc) NPROC=$2; shift 2 ;;
    *) break ;;
  esac
done
EXTRA=("$@")
# several processes through torchrun (README "Several GPUs / several nodes"); one: plain python
if [ "$NPROC" -gt 1 ]; then RUN=($PY -m torch.distributed.run --standalone --nproc_per_node "$NPROC"); else RUN=($PY); fi

# the flags this script needs, after the preset and the extra flags are applied (one source of truth: the
# driver), as shell variables of their names in capitals (WORK_DIR=...): one Python start-up for all
# and the driver's step names (STEP_NAMES)
FLAGS=$($PY -c "import run_sample, shlex, sys; a = run_sample.parse_args(sys.argv[2:])
for name in sys.argv[1].split(): print(f'{name.upper()}={shlex.quote(str(getattr(a, name)))}')
print('STEP_NAMES=' + shlex.quote(' '.join(name for name, _ in run_sample.STEPS)))" \
  "work_dir voc12_root seed pretrained backbone_width ood_pool_root ood_root ood_list ood_pool_list \
   cam_weights_name seg_init_weights" --preset "$PRESET" "${EXTRA[@]}")
eval "$FLAGS"

if [ "$PRESET" = toy ]; then
  if [ ! -f "$VOC12_ROOT/ImageSets/Segmentation/train.txt" ]; then
    echo "== generating ToyVOC into $VOC12_ROOT"
    $PY -m toy.toyvoc --out "$VOC12_ROOT" --ood_out "$OOD_POOL_ROOT" --seed "$SEED"
  fi
  # the toy's stand-in for ImageNet weights, a backbone pre-trained on unrelated generated scenes: the
  # preset's file ships with the project, and toy.toynet checks its record (or pre-trains a missing one)
  if [ "$PRETRAINED" != none ]; then
    $PY -m toy.toynet --out "$PRETRAINED" --width "$BACKBONE_WIDTH"
  fi
else
  # the W-OoD README's steps, each checked where the paper preset looks for it
  missing=()
  absent=()
  for d in JPEGImages Annotations SegmentationClass ImageSets/Segmentation; do
    [ -d "$VOC12_ROOT/$d" ] || absent+=("$d")
  done
  [ ${#absent[@]} -eq 0 ] || missing+=("README step 1 (PASCAL VOC 2012): no ${absent[*]} in $VOC12_ROOT; extract VOCtrainval_11-May-2012.tar and put its VOCdevkit/VOC2012 folder at $VOC12_ROOT (or pass --voc12_root)")
  [ -d "$VOC12_ROOT/SegmentationClassAug" ] || missing+=("README step 1 (SBD's augmented labels): no $VOC12_ROOT/SegmentationClassAug; extract SegmentationClassAug.zip (12031 PNGs) there")
  if [ ! -f "$OOD_LIST" ] && [ ! -f "$OOD_POOL_LIST" ]; then
    missing+=("README step 2 (OoD images): no $OOD_LIST; unzip the released OoD data into WOoD_dataset/openimages (images under $OOD_ROOT, list at $OOD_LIST), or list a candidate pool in $OOD_POOL_LIST for mine_ood")
  elif [ -f "$OOD_LIST" ] && [ ! -d "$OOD_ROOT" ]; then
    missing+=("README step 2 (OoD images): $OOD_LIST is there but its images are not: no folder $OOD_ROOT")
  fi
  [ "$SEG_INIT_WEIGHTS" = none ] || [ -f "$SEG_INIT_WEIGHTS" ] || missing+=("README step 4 (DeepLab-v2's ImageNet init): no $SEG_INIT_WEIGHTS; put deeplab-pytorch's ResNet-101 init (converted from DeepLab's caffe model) or torchvision's resnet101-63fe2227.pth there (--seg_init_weights)")
  if [ ${#missing[@]} -gt 0 ]; then
    echo "The paper's run cannot start (README \"Reproduce the paper on VOC\"):"
    for m in "${missing[@]}"; do echo "  - $m"; done
    exit 1
  fi
  if [ -f "$CAM_WEIGHTS_NAME" ]; then
    echo "== README step 3: the ID classifier $CAM_WEIGHTS_NAME is there; train_cam keeps it"
  else
    echo "== README step 3: no released ID classifier at $CAM_WEIGHTS_NAME; train_cam trains one from $PRETRAINED" \
         "(torchvision's ImageNet file, downloaded when online)"
  fi
fi

OFF=()
for s in $STEP_NAMES; do OFF+=("--${s}_pass" false); done  # every step off; each stage switches its own on
stage() { echo "== stage: $1"; shift; "${RUN[@]}" run_sample.py --preset "$PRESET" "${OFF[@]}" "$@" "${EXTRA[@]}"; }

# mine hard OoD from a candidate pool unless a ready list (e.g. the paper's release) is given
MINE=true
if [ "$PRESET" = paper ] && [ -f "$OOD_LIST" ]; then MINE=false; fi

stage "baseline: ID classifier and its CAMs" \
  --train_cam_pass true --make_cam_pass true --eval_cam_pass true \
  --make_cam_from id --cam_out_dir "$WORK_DIR/baseline_cam" --infer_list train
stage "W-OoD: mine hard OoD, fine-tune, CAMs" \
  --mine_ood_pass "$MINE" --train_wood_pass true --make_cam_pass true --eval_cam_pass true \
  --make_cam_from wood --cam_out_dir "$WORK_DIR/wood_cam" --infer_list train
# docs/method.md §6 makes AdvCAM seeds and IR labels for train_aug and trains IRN there; the toy run uses `train`
# (a third of ToyVOC's train_aug) to stay within 20 minutes on a 2-core CPU (README, Deviations).
if [ "$PRESET" = toy ]; then SEED_LIST=train; else SEED_LIST=train_aug; fi
stage "AdvCAM seeds and IR labels on $SEED_LIST" \
  --make_advcam_pass true --eval_advcam_pass true --cam_to_ir_label_pass true --infer_list "$SEED_LIST"
stage "IRN and pseudo masks" \
  --train_irn_pass true --make_sem_seg_pass true --eval_sem_seg_pass true \
  --train_list "$SEED_LIST" --infer_list train
# IRN's instance masks from the same CAMs and IRN, scored by VOC's instance AP50 (docs/method.md §9)
stage "IRN instance masks" --make_ins_seg_pass true --eval_ins_seg_pass true --infer_list train
# pseudo masks for every image the segmentation network trains on (docs/method.md §6, 8: train_aug; the walk skips the
# train masks it has made). The toy trains on train's masks, its only seeds (README, Deviations).
if [ "$SEED_LIST" != train ]; then
  stage "pseudo masks for $SEED_LIST" --make_sem_seg_pass true --infer_list "$SEED_LIST"
fi
stage "DeepLab-v2 on the pseudo masks" \
  --train_seg_pass true --eval_seg_pass true --seg_train_list "$SEED_LIST"

$PY -m misc.summary --work_dir "$WORK_DIR" --voc12_root "$VOC12_ROOT"
