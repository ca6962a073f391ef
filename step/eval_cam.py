"""Evaluate CAMs (docs/method.md §4.5), IRN's step/eval_cam.py: mIoU of `high_res` CAMs against the ground truth
for a threshold sweep.

For threshold t the prediction is the arg-max over [constant background t, class maps] (ties to the
background), index i -> keys[i-1] + 1. One confusion matrix per threshold is accumulated in a single
pass over the images. Prints the curve (threshold -> mIoU), the best threshold's per-class IoU,
precision and recall, and adds the best to <work_dir>/summary.json (name: --eval_name or the
evaluated folder's name).
"""
import os

import numpy as np
from tqdm import tqdm

from misc import steptools
from misc.camfile import read_items
from misc.metrics import best_threshold, sweep_thresholds
from misc.report import add_to_summary, read_summary, summary_entry
from voc12.dataloader import CAT_LIST, load_img_name_list


def _producing_step(args, cam_dir):
    advcam_dir = args.advcam_out_dir
    if advcam_dir and os.path.abspath(cam_dir) == os.path.abspath(advcam_dir):
        return "make_advcam (--make_advcam_pass true)"
    return "make_cam (--make_cam_pass true) with --cam_out_dir " + cam_dir


def _pct(x):
    return "  n/a" if not np.isfinite(x) else f"{100 * x:5.1f}"


def print_report(name, sweep, best_t, best_scores):
    print(f"eval_cam {name}: threshold -> mIoU")
    for t, s in sweep.items():
        mark = "  <- best" if t == best_t else ""
        print(f"  {t:.3f}  {_pct(s['miou'])}{mark}")
    print(f"  {'class':<12} {'IoU':>5} {'prec':>5} {'rec':>5}  (threshold {best_t})")
    for c, cls in enumerate(["background"] + list(CAT_LIST)):
        iou, prec, rec = best_scores["iou"][c], best_scores["precision"][c], best_scores["recall"][c]
        if np.isfinite(iou):
            print(f"  {cls:<12} {_pct(iou)} {_pct(prec)} {_pct(rec)}")
    print(f"eval_cam {name}: best mIoU {_pct(best_scores['miou'])} at threshold {best_t}")


def run(args):
    read_summary(args.work_dir)  # a corrupt summary.json fails now, not after the evaluation
    cam_dir = args.eval_cam_dir
    name = args.eval_name or os.path.basename(os.path.normpath(cam_dir))
    ids = load_img_name_list(args.voc12_root, args.chainer_eval_set)
    steptools.require_files(cam_dir, ids, ".npz", "CAMs of the evaluated list",
                            f"run {_producing_step(args, cam_dir)} on this list ({args.chainer_eval_set}) first")
    items = tqdm(read_items(args.voc12_root, cam_dir, ids), total=len(ids), desc="eval_cam", unit="img")
    sweep = sweep_thresholds(items, args.cam_eval_thres)
    best_t, best_scores = best_threshold(sweep)
    print_report(name, sweep, best_t, best_scores)
    add_to_summary(args.work_dir, summary_entry(name, "eval_cam", best_scores, best_t))
    return sweep
