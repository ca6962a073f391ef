"""Evaluate instance pseudo labels (docs/method.md §9), IRN's step/eval_ins_seg.py.

Scores `<ins_seg_out_dir>/<id>.npz` (make_ins_seg) against VOC's instance ground truth (SegmentationObject +
SegmentationClass, read as chainercv's VOCInstanceSegmentationDataset) of --chainer_eval_set with chainercv's
eval_instance_segmentation_voc (IoU 0.5, area under the precision envelope; misc/instance_eval.py): AP50 per class
and their mean over the classes with ground truth (the paper's metric; IRN published 46.7 on VOC 2012 train).
Beside it, as a cross-check only, a COCO-style AP at IoU 0.5 from pycocotools' COCOeval (101 recall points,
up to 100 detections per image, detections with score >= 1e-5; misc/coco.py). Prints both and the release's
`0.5iou: {...}` line, and adds an entry to <work_dir>/summary.json (name: --eval_name, else the folder's name).
"""
import os

import numpy as np
from tqdm import tqdm

from misc import coco, steptools
from misc.instance import read_detections
from misc.instance_eval import APAccumulator, ap_result, load_instance_gt, require_instance_gt
from misc.report import add_to_summary, read_summary
from misc.utils import InputError
from voc12.dataloader import CAT_LIST, load_img_name_list

IOU_THRESH = 0.5
SUFFIX = ".npz"  # make_ins_seg's files


def _percent(x):
    return None if not np.isfinite(x) else round(float(x) * 100, 2)


def evaluate(ins_seg_out_dir, voc12_root, ids, iou_thresh=IOU_THRESH):
    """{"ap": (20,) per class (NaN: no ground-truth instance), "map", "coco_ap50", "coco_ap": (20,)} of the
    instance files of `ids`, one image in memory at a time."""
    accumulator = APAccumulator(iou_thresh)
    detections, ground_truth = coco.new_coco(), coco.new_coco()
    for img_id in tqdm(ids, desc="eval_ins_seg", dynamic_ncols=True):
        path = steptools.output_path(ins_seg_out_dir, img_id, SUFFIX)
        det = read_detections(path)
        gt_masks, gt_labels = load_instance_gt(voc12_root, img_id)
        if det["mask"].shape[1:] != gt_masks.shape[1:]:
            raise InputError(f"{path} holds masks of size {det['mask'].shape[1:]} but the image is "
                             f"{gt_masks.shape[1:]}: the instance files belong to other images; re-run make_ins_seg")
        accumulator.add(det["mask"], det["class"], det["score"], gt_masks, gt_labels)
        for out in (detections, ground_truth):
            out["images"].append(coco.image_entry(img_id, gt_masks.shape[1:]))
        detections["annotations"] += coco.detection_annotations(img_id, det, len(detections["annotations"]) + 1)
        ground_truth["annotations"] += coco.ground_truth_annotations(img_id, gt_masks, gt_labels,
                                                                     len(ground_truth["annotations"]) + 1)
    result = ap_result(*accumulator.prec_rec())
    ap = np.full(len(CAT_LIST), np.nan)
    ap[:len(result["ap"])] = result["ap"][:len(CAT_LIST)]
    coco_mean, coco_per_class = coco.coco_ap50(ground_truth, detections)
    return {"ap": ap, "map": result["map"], "raw_ap": result["ap"], "coco_ap50": coco_mean,
            "coco_ap": np.array([coco_per_class.get(c, np.nan) for c in range(len(CAT_LIST))])}


def summary_entry(name, result, n_images, eval_set):
    """The summary.json entry (values in %, classes without ground truth null)."""
    return {"name": name, "step": "eval_ins_seg", "map": _percent(result["map"]),
            "ap": {c: _percent(v) for c, v in zip(CAT_LIST, result["ap"])},
            "coco_ap50": _percent(result["coco_ap50"]), "iou_thresh": IOU_THRESH, "images": n_images,
            "eval_set": str(eval_set)}


def run(args):
    read_summary(args.work_dir)  # a corrupt summary.json fails now, not after the evaluation
    ids = load_img_name_list(args.voc12_root, args.chainer_eval_set)
    steptools.require_files(args.ins_seg_out_dir, ids, SUFFIX, "instance masks of the evaluated list",
                            "run make_ins_seg (--make_ins_seg_pass true) on (at least) the evaluated list")
    require_instance_gt(args.voc12_root, ids)
    result = evaluate(args.ins_seg_out_dir, args.voc12_root, ids)
    name = args.eval_name or os.path.basename(os.path.normpath(args.ins_seg_out_dir))
    add_to_summary(args.work_dir, summary_entry(name, result, len(ids), args.chainer_eval_set))
    print("0.5iou:", {"ap": result["raw_ap"], "map": result["map"]})  # the release's line
    per_class = ", ".join(f"{c} {v * 100:.1f}" for c, v in zip(CAT_LIST, result["ap"]) if np.isfinite(v))
    print(f"eval_ins_seg: {name} AP50 (VOC, chainercv's rule) {result['map'] * 100:.2f} % on {len(ids)} images "
          f"({args.chainer_eval_set}); per class: {per_class or 'no class with ground truth'}")
    print(f"eval_ins_seg: cross-check, not the paper's metric: COCO-style AP@0.5 (pycocotools) "
          f"{result['coco_ap50'] * 100:.2f} %")
