"""Where do the pseudo masks gain or lose against their CAM seeds? ToyVOC's cue masks split the pixels.

    python toy/seeds_vs_masks.py --voc12_root Data/ToyVOC --seed_dir result/toy/wood_advcam \
        --mask_dir result/toy/pseudo_mask [--list train]

The seeds are scored as eval_cam scores them (best mIoU of the toy preset's threshold sweep), the pseudo
masks as eval_sem_seg does. Then, for every label class k of an image, the share of its pixels labelled k
by the seeds (at their best threshold) and by the pseudo masks, per kind of pixel: the object (ground
truth k), its own cue (CueMasks == k + 1) and the rest of the background. Last, both are scored again
with every cue pixel left out (void): what the IRN stage does to objects and plain background, apart
from the cues it cannot separate from their objects (docs/toy.md, "The IRN stage on the toy"); the seeds again
take their best threshold of the sweep.

Last line: `seeds_miou=<a> masks_miou=<b> seeds_miou_cue_void=<c> masks_miou_cue_void=<d>` (%).
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import run_sample  # noqa: E402
from misc.camfile import read_items  # noqa: E402
from misc.metrics import (  # noqa: E402  # noqa: E402
    IGNORE,
    best_threshold,
    confusion_matrix,
    labels_for_thresholds,
    prediction_as_label,
    scores,
    sweep_thresholds,
)
from voc12.dataloader import load_img_name_list, read_index_png  # noqa: E402

KINDS = ("object", "own cue", "other background")


def pixel_kinds(gt, cue, k):
    """Masks of the three kinds of pixel for label class k (void ground truth belongs to none)."""
    return (gt == k + 1), (cue == k + 1), (gt == 0) & (cue != k + 1)


def labelled_as_class(pred, gt, cue, keys):
    """(len(KINDS), 2) counts: pixels of each kind labelled as their class, and pixels of that kind."""
    counts = np.zeros((len(KINDS), 2), np.int64)
    for k in keys:
        for row, mask in enumerate(pixel_kinds(gt, cue, k)):
            counts[row] += ((pred[mask] == k + 1).sum(), mask.sum())
    return counts


def cue_void(gt, cue):
    out = gt.copy()
    out[cue > 0] = IGNORE
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--voc12_root", default="Data/ToyVOC")
    p.add_argument("--seed_dir", required=True, help="the CAM seeds (.npz) the walk started from")
    p.add_argument("--mask_dir", required=True, help="the pseudo masks (.png)")
    p.add_argument("--list", default="train")
    a = p.parse_args()
    thresholds = run_sample.parse_args(["--preset", "toy"]).cam_eval_thres
    ids = load_img_name_list(a.voc12_root, a.list)
    cues = {i: read_index_png(os.path.join(a.voc12_root, "CueMasks", i + ".png"), "a ToyVOC cue mask") for i in ids}
    items = list(read_items(a.voc12_root, a.seed_dir, ids))
    masks = {i: prediction_as_label(read_index_png(os.path.join(a.mask_dir, i + ".png"), "a pseudo mask"))
             for i in ids}

    void_gts = [cue_void(gt, cues[i]) for i, (_, _, gt) in zip(ids, items)]

    def score_masks(gts):
        return scores(confusion_matrix([masks[i] for i in ids], gts))["miou"] * 100

    t_seed, seed_scores = best_threshold(sweep_thresholds(items, thresholds))
    t_void, void_scores = best_threshold(sweep_thresholds(
        ((h, k, gt) for (h, k, _), gt in zip(items, void_gts)), thresholds))
    counts = np.zeros((2, len(KINDS), 2), np.int64)
    for i, (high_res, keys, gt) in zip(ids, items):
        (seed_label,) = labels_for_thresholds(high_res, keys, [t_seed])
        counts[0] += labelled_as_class(seed_label, gt, cues[i], keys)
        counts[1] += labelled_as_class(masks[i], gt, cues[i], keys)

    seeds, masks_miou = seed_scores["miou"] * 100, score_masks([gt for _, _, gt in items])
    seeds_void, masks_void = void_scores["miou"] * 100, score_masks(void_gts)
    print(f"{len(ids)} images of {a.list}: seeds {seeds:.2f} (threshold {t_seed}), pseudo masks {masks_miou:.2f}")
    print("pixels labelled as their image's class (seeds / pseudo masks):")
    for row, kind in enumerate(KINDS):
        n = counts[0, row, 1]
        print(f"  {kind:>16s}: {100 * counts[0, row, 0] / n:5.1f} % / {100 * counts[1, row, 0] / n:5.1f} %"
              f"  ({n} pixels)")
    print(f"cue pixels void: seeds {seeds_void:.2f} (threshold {t_void}), pseudo masks {masks_void:.2f}")
    print(f"seeds_miou={seeds:.2f} masks_miou={masks_miou:.2f} seeds_miou_cue_void={seeds_void:.2f} "
          f"masks_miou_cue_void={masks_void:.2f}")


if __name__ == "__main__":
    main()
