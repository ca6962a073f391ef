"""Segmentation metric of SPEC 4.5 (same numbers as chainercv's calc_semantic_segmentation_confusion /
calc_semantic_segmentation_iou, which the paper used) and the CAM -> label map rule of eval_cam.

Ground truth 255 is "ignore". chainercv grows its matrix to the largest label seen; a fixed
`n_class` gives the same IoUs because classes absent from both sides are NaN and left out of the mean.
"""
import numpy as np

IGNORE = 255


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
