"""Evaluate CAMs (SPEC 4.5): mIoU of `high_res` CAMs against the ground truth for a threshold sweep.

For threshold t the prediction is the arg-max over [constant background t, class maps] (ties to the
background), index i -> keys[i-1] + 1. One confusion matrix per threshold is accumulated in a single
pass over the images. Prints the curve (threshold -> mIoU), the best threshold's per-class IoU,
precision and recall, and adds the best to <work_dir>/summary.json (name: --eval_name or the
evaluated folder's name).
"""
import os

import numpy as np
from tqdm import tqdm

from misc.camfile import read_cam_file
from misc.metrics import confusion_matrix, scores
from misc.report import add_to_summary, read_summary, summary_entry
from misc.utils import InputError, pending, require_dir
from voc12.dataloader import CAT_LIST, load_gt, load_image_labels, load_img_name_list

N_LABELS = len(CAT_LIST) + 1  # background + 20 classes
_MAX_LISTED = 5


# --------------------------------------------------------------------------------------------- maths

def labels_for_thresholds(high_res, keys, thresholds):
    """The label maps of `misc.metrics.cam_to_label` for every threshold, from one arg-max over classes.

    argmax([t, c_1..c_n]) is 0 unless max_c > t (ties go to the background, which comes first),
    else 1 + argmax(c) (ties to the first class). t is cast to the maps' dtype as the original's
    np.pad does. Returns a list of (H, W) uint8 maps, one per threshold.
    """
    high_res = np.asarray(high_res)
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    if high_res.shape[0] == 0:
        return [np.zeros(high_res.shape[1:], np.uint8) for _ in thresholds]
    best = np.argmax(high_res, axis=0)
    best_value = np.take_along_axis(high_res, best[None], axis=0)[0]
    class_label = (keys + 1).astype(np.uint8)[best]
    return [np.where(best_value > np.asarray(t, dtype=high_res.dtype), class_label, 0).astype(np.uint8)
            for t in thresholds]


def threshold_confusions(items, thresholds, n_class=N_LABELS):
    """One (n_class, n_class) confusion matrix per threshold over (high_res, keys, gt) triples, in one
    pass over `items` (an iterable, e.g. a generator reading files)."""
    thresholds = list(thresholds)
    confusions = [np.zeros((n_class, n_class), np.int64) for _ in thresholds]
    for high_res, keys, gt in items:
        for conf, pred in zip(confusions, labels_for_thresholds(high_res, keys, thresholds)):
            conf += confusion_matrix([pred], [gt], n_class)
    return confusions


def _same(confusions):
    return confusions


def sweep_thresholds(items, thresholds, n_class=N_LABELS, reduce=_same):
    """Scores (misc.metrics.scores dict) per threshold, each from its own confusion matrix.

    Returns {threshold: scores}, in the order of `thresholds`. `reduce` is applied to the stacked
    (n_thresholds, n_class, n_class) matrices first (misc.dist.total_array: add the ranks' matrices).
    """
    confusions = reduce(np.stack(threshold_confusions(items, thresholds, n_class)))
    return {t: scores(conf) for t, conf in zip(thresholds, confusions)}


def accumulated_sweep(items, thresholds, n_class=N_LABELS, reduce=_same):
    """The released checkpoint selection's scores (SPEC 4.3 (a)): its `eval_cam_sub` keeps one list of
    predictions and ground truths for the whole threshold loop, so the score at threshold t comes from
    one confusion matrix over the predictions of every threshold up to and including t, i.e. the running
    sum of the per-threshold matrices. Returns {threshold: scores}, in the order of `thresholds`.
    """
    confusions = np.cumsum(reduce(np.stack(threshold_confusions(items, thresholds, n_class))), axis=0)
    return {t: scores(conf) for t, conf in zip(thresholds, confusions)}


def best_threshold(sweep):
    """(threshold, scores) of the highest mIoU (the first one on ties); NaN mIoUs never win."""
    finite = [(t, s) for t, s in sweep.items() if np.isfinite(s["miou"])]
    if not finite:
        t = next(iter(sweep))
        return t, sweep[t]
    return max(finite, key=lambda ts: ts[1]["miou"])


# -------------------------------------------------------------------------------------------- I/O

def _producing_step(args, cam_dir):
    advcam_dir = args.advcam_out_dir
    if advcam_dir and os.path.abspath(cam_dir) == os.path.abspath(advcam_dir):
        return "make_advcam (--make_advcam_pass true)"
    return "make_cam (--make_cam_pass true) with --cam_out_dir " + cam_dir


def require_cams(args, cam_dir, ids):
    """InputError naming the folder, the first missing ids and the step to run, unless all CAMs exist."""
    require_dir(cam_dir, f"the CAMs <id>.npz of the {len(ids)} evaluated images; run "
                         f"{_producing_step(args, cam_dir)} first")
    missing = pending(ids, lambda i: os.path.join(cam_dir, i + ".npz"))
    if missing:
        raise InputError(f"{cam_dir} lacks the CAMs of {len(missing)} of the {len(ids)} evaluated images "
                         f"(e.g. {', '.join(missing[:_MAX_LISTED])}); run {_producing_step(args, cam_dir)} "
                         f"on this list ({args.chainer_eval_set})")


def read_items(voc12_root, cam_dir, ids):
    """(high_res, keys, gt) per id; InputError if a CAM does not match its ground truth's size."""
    labels = load_image_labels(voc12_root, ids)
    for img_id, label in zip(ids, labels):
        gt = load_gt(voc12_root, img_id)
        keys, high_res = read_cam_file(os.path.join(cam_dir, img_id + ".npz"), "high_res", label, gt.shape)
        yield high_res, keys, gt


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
    require_cams(args, cam_dir, ids)
    items = tqdm(read_items(args.voc12_root, cam_dir, ids), total=len(ids), desc="eval_cam", unit="img")
    sweep = sweep_thresholds(items, args.cam_eval_thres)
    best_t, best_scores = best_threshold(sweep)
    print_report(name, sweep, best_t, best_scores)
    add_to_summary(args.work_dir, summary_entry(name, "eval_cam", best_scores, best_t))
    return sweep
