"""VOC instance-segmentation AP (docs/method.md §9): chainercv's eval_instance_segmentation_voc, written here
(chainercv no longer builds), and the ground truth as chainercv's VOCInstanceSegmentationDataset reads it.

Per class, over all images: the predictions of an image are sorted by score (descending), each is matched
to the ground-truth instance of its class with the highest mask IoU (over all pixels, float32 as chainercv);
it is a true positive if that IoU >= iou_thresh and the instance was not matched before, else a false
positive. Precision / recall are cumulative over all predictions of the class sorted by score; AP is the
area under the precision envelope (or the 11-point VOC 2007 metric); a class with no ground-truth instance
has AP NaN and is left out of the mean.

Ties in score: chainercv sorts with numpy's default (unstable) argsort reversed, whose order of equal scores
depends on the machine (AVX-512 sorts differ); here a stable argsort reversed (the later of two equal
scores first), which is what the default sort gives wherever it is stable (docs/deviations.md).
"""
import os
from collections import defaultdict

import numpy as np

from misc.utils import InputError, require_dir
from voc12.dataloader import read_index_png

INSTANCE_FOLDER = "SegmentationObject"
VOID = 255


def _descending(scores):
    """Indices sorting `scores` from high to low; equal scores: the later index first."""
    return np.argsort(np.asarray(scores), kind="stable")[::-1]


def mask_iou(masks_a, masks_b):
    """IoU (len(a), len(b)) float32 of two stacks of bool masks (N, H, W), as chainercv's mask_iou."""
    masks_a, masks_b = np.asarray(masks_a, dtype=bool), np.asarray(masks_b, dtype=bool)
    if masks_a.shape[1:] != masks_b.shape[1:]:
        raise ValueError(f"masks of sizes {masks_a.shape[1:]} and {masks_b.shape[1:]} cannot be compared")
    flat_a = masks_a.reshape(len(masks_a), -1).astype(np.float64)
    flat_b = masks_b.reshape(len(masks_b), -1).astype(np.float64)
    intersection = flat_a @ flat_b.T  # pixel counts, exact in float64 (BLAS: far faster than integer products)
    union = flat_a.sum(1)[:, None] + flat_b.sum(1)[None, :] - intersection
    with np.errstate(divide="ignore", invalid="ignore"):
        return (intersection / union).astype(np.float32)


class APAccumulator:
    """chainercv's calc_instance_segmentation_voc_prec_rec one image at a time (`add`), so that a whole split's
    masks never sit in memory together; `prec_rec()` at the end."""

    def __init__(self, iou_thresh=0.5):
        self.iou_thresh = iou_thresh
        self.n_pos, self.score, self.match = defaultdict(int), defaultdict(list), defaultdict(list)

    def add(self, pred_mask, pred_label, pred_score, gt_mask, gt_label):
        """One image: predictions (N, H, W) bool, (N,) classes, (N,) scores; ground truth (K, H, W), (K,)."""
        pred_mask, gt_mask = np.asarray(pred_mask, dtype=bool), np.asarray(gt_mask, dtype=bool)
        pred_label, gt_label = np.asarray(pred_label).reshape(-1), np.asarray(gt_label).reshape(-1)
        pred_score = np.asarray(pred_score).reshape(-1)
        for label in np.unique(np.concatenate((pred_label, gt_label)).astype(int)):
            keep = pred_label == label
            order = _descending(pred_score[keep])
            pred_mask_l, pred_score_l = pred_mask[keep][order], pred_score[keep][order]
            gt_mask_l = gt_mask[gt_label == label]
            self.n_pos[label] += int((gt_label == label).sum())
            self.score[label].extend(pred_score_l.tolist())
            if len(pred_mask_l) == 0:
                continue
            if len(gt_mask_l) == 0:
                self.match[label].extend([0] * len(pred_mask_l))
                continue
            iou = mask_iou(pred_mask_l, gt_mask_l)
            gt_index = iou.argmax(axis=1)  # the best instance, matched before or not
            gt_index[iou.max(axis=1) < self.iou_thresh] = -1
            taken = np.zeros(len(gt_mask_l), dtype=bool)
            for index in gt_index:
                self.match[label].append(int(index >= 0 and not taken[index]))
                if index >= 0:
                    taken[index] = True

    def prec_rec(self):
        """(prec, rec): lists indexed by class up to the largest class seen; None for a class never seen (rec:
        also for a class without ground truth)."""
        if not self.n_pos:
            return [], []
        n_classes = max(self.n_pos) + 1
        prec, rec = [None] * n_classes, [None] * n_classes
        for label, n_pos in self.n_pos.items():
            matched = np.asarray(self.match[label], dtype=np.int8)[_descending(self.score[label])]
            tp, fp = np.cumsum(matched == 1), np.cumsum(matched == 0)
            with np.errstate(divide="ignore", invalid="ignore"):
                prec[label] = tp / (fp + tp)
            if n_pos > 0:
                rec[label] = tp / n_pos
        return prec, rec


def instance_prec_rec(pred_masks, pred_labels, pred_scores, gt_masks, gt_labels, iou_thresh=0.5):
    """chainercv's calc_instance_segmentation_voc_prec_rec over iterables of per-image arrays (see APAccumulator)."""
    accumulator = APAccumulator(iou_thresh)
    iterators = [iter(x) for x in (pred_masks, pred_labels, pred_scores, gt_masks, gt_labels)]
    end = object()
    while True:
        image = [next(it, end) for it in iterators]
        if all(x is end for x in image):
            return accumulator.prec_rec()
        if any(x is end for x in image):
            raise ValueError("predictions and ground truths cover different numbers of images")
        accumulator.add(*image)


def voc_ap(prec, rec, use_07_metric=False):
    """chainercv's calc_detection_voc_ap: AP per class (NaN where prec or rec is None)."""
    ap = np.empty(len(prec))
    for label, (p, r) in enumerate(zip(prec, rec)):
        if p is None or r is None:
            ap[label] = np.nan
        elif use_07_metric:  # the mean of the best precision at recall >= 0, 0.1, ..., 1
            ap[label] = sum((np.max(np.nan_to_num(p)[r >= t]) if np.sum(r >= t) else 0) / 11
                            for t in np.arange(0., 1.1, 0.1))
        else:
            precision = np.concatenate(([0], np.nan_to_num(p), [0]))
            recall = np.concatenate(([0], r, [1]))
            precision = np.maximum.accumulate(precision[::-1])[::-1]  # the envelope, from the right
            steps = np.where(recall[1:] != recall[:-1])[0]
            ap[label] = np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1])
    return ap


def eval_instance_segmentation_voc(pred_masks, pred_labels, pred_scores, gt_masks, gt_labels, iou_thresh=0.5,
                                   use_07_metric=False):
    """chainercv's function: {"ap": per class (up to the largest class seen), "map": nanmean of ap}."""
    return ap_result(*instance_prec_rec(pred_masks, pred_labels, pred_scores, gt_masks, gt_labels, iou_thresh),
                     use_07_metric)


def ap_result(prec, rec, use_07_metric=False):
    """{"ap": voc_ap(prec, rec), "map": the mean of the APs that are not NaN (NaN if none)}."""
    ap = voc_ap(prec, rec, use_07_metric)
    defined = ap[~np.isnan(ap)]
    return {"ap": ap, "map": float(defined.mean()) if defined.size else float("nan")}


# --------------------------------------------------------------------------------------------- ground truth

def instance_gt_path(voc12_root, img_id):
    return os.path.join(voc12_root, INSTANCE_FOLDER, img_id + ".png")


def instances_from_maps(class_map, object_map, where="the ground truth"):
    """chainercv's image_wise_to_instance_wise: (masks (K, H, W) bool, labels (K,) int32) of the object ids
    other than 0 and 255 in ascending order; label = the smallest class value under the instance minus 1."""
    class_map, object_map = np.asarray(class_map), np.asarray(object_map)
    if class_map.shape != object_map.shape:
        raise InputError(f"{where}: SegmentationObject is {object_map.shape} but SegmentationClass is "
                         f"{class_map.shape}")
    masks, labels = [], []
    for object_id in np.unique(object_map):
        if object_id in (0, VOID):
            continue
        mask = object_map == object_id
        values = np.unique(class_map[mask])
        if values[0] in (0, VOID):
            raise InputError(f"{where}: object {object_id} covers pixels of class value {values[0]} "
                             f"(background or void); each object must lie on its class's pixels")
        masks.append(mask)
        labels.append(int(values[0]) - 1)
    return (np.asarray(masks, dtype=bool).reshape((-1,) + class_map.shape), np.asarray(labels, dtype=np.int32))


def load_instance_gt(voc12_root, img_id):
    """(masks (K, H, W) bool, labels (K,) int32) of an image, from SegmentationObject + SegmentationClass."""
    from voc12.dataloader import load_gt
    object_map = read_index_png(instance_gt_path(voc12_root, img_id), "a VOC SegmentationObject palette PNG")
    return instances_from_maps(load_gt(voc12_root, img_id), object_map, instance_gt_path(voc12_root, img_id))


def require_instance_gt(voc12_root, ids):
    """InputError unless every id has a SegmentationObject PNG (VOC ships them for train and val only)."""
    folder = require_dir(os.path.join(voc12_root, INSTANCE_FOLDER),
                         "the VOC 2012 instance ground truth <id>.png (SegmentationObject) of the evaluated list")
    missing = [i for i in ids if not os.path.isfile(instance_gt_path(voc12_root, i))]
    if missing:
        raise InputError(f"{len(missing)} of {len(ids)} instance ground truth(s) missing from {folder}, e.g. "
                         f"{instance_gt_path(voc12_root, missing[0])}: evaluate a list of VOC's segmentation "
                         f"split (train / val) with --chainer_eval_set")
