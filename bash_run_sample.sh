#!/usr/bin/env bash
# The W-OoD pipeline end to end (SPEC 6).
#
#   bash bash_run_sample.sh --toy            # ToyVOC on a CPU: generates the data if missing
#   bash bash_run_sample.sh                  # the paper's configuration on real VOC 2012
#   bash bash_run_sample.sh --toy --train_cam_pass false --device cpu    # extra flags go to every stage
#
# Every stage is one call of run_sample.py; every step resumes (finished outputs are skipped), so the
# same command continues an interrupted run. Results: <work_dir>/summary.json, summary.md, samples.png.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}

PRESET=paper
if [ "${1:-}" = "--toy" ]; then PRESET=toy; shift; fi
EXTRA=("$@")

# the value of a flag after the preset and the extra flags are applied (one source of truth: the driver)
flag() { $PY -c "import run_sample, sys; print(getattr(run_sample.parse_args(sys.argv[1:]), '$1'))" \
             --preset "$PRESET" "${EXTRA[@]}"; }
WORK_DIR=$(flag work_dir)
VOC12_ROOT=$(flag voc12_root)

if [ "$PRESET" = toy ]; then
  if [ ! -f "$VOC12_ROOT/ImageSets/Segmentation/train.txt" ]; then
    echo "== generating ToyVOC into $VOC12_ROOT"
    $PY -m misc.toyvoc --out "$VOC12_ROOT" --ood_out "$(flag ood_pool_root)" --seed "$(flag seed)"
  fi
  # the toy's stand-in for ImageNet weights: a backbone pre-trained on unrelated generated scenes
  PRETRAINED=$(flag pretrained)
  if [ "$PRETRAINED" != none ] && [ ! -f "$PRETRAINED" ]; then
    echo "== pre-training the ToyNet backbone into $PRETRAINED"
    $PY -m misc.toynet --out "$PRETRAINED" --width "$(flag backbone_width)" --threads "$(flag cpu_threads)"
  fi
else
  missing=0
  for d in JPEGImages Annotations SegmentationClass SegmentationClassAug ImageSets/Segmentation; do
    [ -d "$VOC12_ROOT/$d" ] || { echo "missing: $VOC12_ROOT/$d"; missing=1; }
  done
  PRETRAINED=$(flag pretrained)
  OOD_LIST=$(flag ood_list); OOD_POOL_LIST=$(flag ood_pool_list)
  [ -f "$OOD_LIST" ] || [ -f "$OOD_POOL_LIST" ] || { echo "missing: $OOD_LIST (or a candidate pool $OOD_POOL_LIST)"; missing=1; }
  SEG_INIT=$(flag seg_init_weights)
  [ "$SEG_INIT" = none ] || [ -f "$SEG_INIT" ] || { echo "missing: $SEG_INIT (DeepLab-v2's ImageNet init)"; missing=1; }
  if [ $missing = 1 ]; then
    cat <<EOF

The paper's run needs (see README "Data and weights"):
  1. PASCAL VOC 2012: download VOCtrainval_11-May-2012.tar from the PASCAL VOC site, extract it and
     put (or link) its VOCdevkit/VOC2012 folder at $VOC12_ROOT (or pass --voc12_root).
  2. SBD's augmented labels: SegmentationClassAug.zip (12031 PNGs, the usual DeepLab/IRN download);
     extract it to $VOC12_ROOT/SegmentationClassAug/.
  3. OoD images: the W-OoD release's hard-OoD images under $(flag ood_root) with their list at
     $OOD_LIST, or a candidate pool under $(flag ood_pool_root) listed in $OOD_POOL_LIST (mine_ood).
  4. ImageNet weights: $PRETRAINED is downloaded from torchvision's URL when online
     (https://download.pytorch.org/models/resnet50-19c8e357.pth); offline, put the file there.
  5. DeepLab-v2's ImageNet init at $SEG_INIT: deeplab-pytorch's ResNet-101 converted from DeepLab's caffe
     init model, or torchvision's resnet101-63fe2227.pth (--seg_init_weights; README "Step 4").
EOF
    exit 1
  fi
fi

OFF=()
for s in train_cam mine_ood train_wood make_cam eval_cam make_advcam eval_advcam cam_to_ir_label \
         train_irn make_sem_seg eval_sem_seg train_seg eval_seg; do OFF+=("--${s}_pass" false); done
stage() { echo "== stage: $1"; shift; $PY run_sample.py --preset "$PRESET" "${OFF[@]}" "$@" "${EXTRA[@]}"; }

# mine hard OoD from a candidate pool unless a ready list (e.g. the paper's release) is given
MINE=true
if [ "$PRESET" = paper ] && [ -f "$(flag ood_list)" ]; then MINE=false; fi

stage "baseline: ID classifier and its CAMs" \
  --train_cam_pass true --make_cam_pass true --eval_cam_pass true \
  --make_cam_from id --cam_out_dir "$WORK_DIR/baseline_cam" --infer_list train
stage "W-OoD: mine hard OoD, fine-tune, CAMs" \
  --mine_ood_pass "$MINE" --train_wood_pass true --make_cam_pass true --eval_cam_pass true \
  --make_cam_from wood --cam_out_dir "$WORK_DIR/wood_cam" --infer_list train
# SPEC 6 makes AdvCAM seeds and IR labels for train_aug and trains IRN there; the toy run uses `train`
# (a third of ToyVOC's train_aug) to stay within 20 minutes on a 2-core CPU (README, Deviations).
if [ "$PRESET" = toy ]; then SEED_LIST=train; else SEED_LIST=train_aug; fi
stage "AdvCAM seeds and IR labels on $SEED_LIST" \
  --make_advcam_pass true --eval_advcam_pass true --cam_to_ir_label_pass true --infer_list "$SEED_LIST"
stage "IRN and pseudo masks" \
  --train_irn_pass true --make_sem_seg_pass true --eval_sem_seg_pass true \
  --train_list "$SEED_LIST" --infer_list train
# pseudo masks for every image the segmentation network trains on (SPEC 6, 8: train_aug; the walk skips the
# train masks it has made). The toy trains on train's masks, its only seeds (README, Deviations).
if [ "$SEED_LIST" != train ]; then
  stage "pseudo masks for $SEED_LIST" --make_sem_seg_pass true --infer_list "$SEED_LIST"
fi
stage "DeepLab-v2 on the pseudo masks" \
  --train_seg_pass true --eval_seg_pass true --seg_train_list "$SEED_LIST"

$PY -m misc.summary --work_dir "$WORK_DIR" --voc12_root "$VOC12_ROOT"
