"""Segmentation metric of docs/method.md §4.5 (same numbers as chainercv's calc_semantic_segmentation_confusion /
calc_semantic_segmentation_iou, which the paper used) and the CAM -> label map rule of eval_cam.

Ground truth 255 is "ignore". chainercv grows its matrix to the largest label seen; a fixed
`n_class` gives the same IoUs because classes absent from both sides are NaN and left out of the mean.
"""
import os

import numpy as np

IGNORE = 255
N_LABELS = 21  # background + the 20 VOC classes


def confusion_matrix(pred_labels, gt_labels, n_class=21):
    """(n_class, n_class) int64 counts, rows = ground truth, columns = prediction, over all pairs.

    Pixels whose ground truth is 255 are skipped. Every other pixel must have ground truth and
    prediction in [0, n_class) (a 255 prediction must be mapped by the caller first): ValueError.
    """
    confusion = np.zeros((n_class, n_class), dtype=np.int64)
    pred_iter, gt_iter = iter(pred_labels), iter(gt_labels)
    sentinel = object()
    while True:
        pred, gt = next(pred_iter, sentinel), next(gt_iter, sentinel)
        if pred is sentinel or gt is sentinel:
            if pred is not gt:
                raise ValueError("pred_labels and gt_labels have different lengths")
            return confusion
        pred, gt = np.asarray(pred), np.asarray(gt)
        if pred.ndim != 2 or gt.ndim != 2:
            raise ValueError(f"label maps must be 2-D, got prediction {pred.shape} and ground truth {gt.shape}")
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
        valid = gt != IGNORE
        gt_v = gt[valid].astype(np.int64)
        pred_v = pred[valid].astype(np.int64)
        if gt_v.size and (gt_v.min() < 0 or gt_v.max() >= n_class):
            raise ValueError(f"ground truth values must be in [0, {n_class}) or {IGNORE}, "
                             f"got {sorted(set(np.unique(gt_v)) - set(range(n_class)))}")
        if pred_v.size and (pred_v.min() < 0 or pred_v.max() >= n_class):
            raise ValueError(f"predictions must be in [0, {n_class}) where the ground truth is valid, "
                             f"got {sorted(set(np.unique(pred_v)) - set(range(n_class)))}")
        confusion += np.bincount(n_class * gt_v + pred_v, minlength=n_class * n_class).reshape(n_class, n_class)


def scores(confusion):
    """Per-class IoU, precision, recall (NaN where undefined) and mIoU (mean of the defined IoUs)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    gt_count = confusion.sum(axis=1)
    pred_count = confusion.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = tp / (gt_count + pred_count - tp)
        precision = tp / pred_count
        recall = tp / gt_count
    defined = ~np.isnan(iou)
    miou = float(iou[defined].mean()) if defined.any() else float("nan")
    return {"iou": iou, "miou": miou, "precision": precision, "recall": recall}


def cam_to_label(high_res, keys, bg_threshold):
    """(H, W) uint8 label map: argmax over [constant bg = threshold, class maps], ties to the first.

    `high_res` is (K, H, W) (one map per key); index 0 -> 0 (background), index i -> keys[i-1] + 1.
    The background map has the CAMs' dtype, as np.pad in the original, so ties are decided alike.
    """
    high_res = np.asarray(high_res)
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    if high_res.ndim != 3 or high_res.shape[0] != keys.size:
        raise ValueError(f"high_res must be (len(keys), H, W), got {high_res.shape} for {keys.size} keys")
    bg = np.full((1,) + high_res.shape[1:], bg_threshold, dtype=high_res.dtype)
    index = np.argmax(np.concatenate([bg, high_res], axis=0), axis=0)
    lookup = np.concatenate([[0], keys + 1]).astype(np.uint8)
    return lookup[index]


def prediction_as_label(pred):
    """Class values with 255 ("unsure") counted as background (eval_sem_seg, docs/method.md §5.4)."""
    pred = np.array(pred, dtype=np.uint8)
    pred[pred == IGNORE] = 0
    return pred


# ------------------------------------------------------------------------------- threshold sweeps

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
    """The released checkpoint selection's scores (docs/method.md §4.3): its `eval_cam_sub` keeps one list of
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


def score_label_folder(folder, voc12_root, ids, unsure_as_background=False, desc=None):
    """misc.metrics.scores of the label PNGs `<folder>/<id>.png` against the VOC ground truth of `ids`
    (255 predictions count as background with `unsure_as_background`); InputError naming a file that cannot
    be scored (wrong size, values outside the 21 classes)."""
    from tqdm import tqdm

    from misc.utils import InputError
    from voc12.dataloader import load_gt, read_index_png
    confusion = np.zeros((N_LABELS, N_LABELS), dtype=np.int64)
    for img_id in tqdm(ids, desc=desc, disable=desc is None, dynamic_ncols=True):
        path = os.path.join(folder, img_id + ".png")
        pred = read_index_png(path, "a single-channel label PNG")
        if unsure_as_background:
            pred = prediction_as_label(pred)
        try:
            confusion += confusion_matrix([pred], [load_gt(voc12_root, img_id)], n_class=N_LABELS)
        except ValueError as e:
            raise InputError(f"cannot score {path} against its ground truth: {e}") from None
    return scores(confusion)
