"""Is the CAM on ToyVOC's cue pixels the cue's own evidence or the object's context?

    python toy/cue_context.py --voc12_root Data/ToyVOC --ood_root WOoD_dataset/toy \
        --weights sess/toy/res50_cam.pth sess/toy/res50_wood.pth [--list train --width 16]

W-OoD can only remove activation that the cue texture causes by itself: it teaches the classifier that
cue-only images hold no class. For each classifier this prints the mean raw class-map score
`conv2d(stage4(x), classifier.weight)` of a class (single scale, bilinearly resized to the image) on
- ID images of `--list` that show the class's cue: its object pixels, its own-cue pixels within
  `--near` px of the object, and its own-cue pixels more than `--far` px away;
- the hard OoD candidates of the pool (manifest.json, CueMasks/): the cue pixels of their class's cue,
  and the share of candidates whose sigmoid score for that class exceeds 0.5 (fooled).
If the OoD cue score falls after fine-tuning while the ID cue scores stay, the network tells "cue with
an object" from "cue alone" (its receptive field sees the object from the cue pixels), and the
CAM mass on cues cannot follow. Last line per classifier:
`weights=<file> object=<s> cue_near=<s> cue_far=<s> ood_cue=<s> ood_fooled=<share>`.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import run_sample  # noqa: E402
from misc.imutils import hwc_to_chw, normalize, read_rgb  # noqa: E402
from net.classifier import load_classifier  # noqa: E402
from voc12.dataloader import CAT_LIST, load_gt, load_image_labels, load_img_name_list, read_index_png  # noqa: E402


def raw_maps(model, rgb):
    """(20, H, W) raw class maps of one RGB uint8 image at scale 1, resized to the image."""
    maps = model.class_maps(torch.from_numpy(hwc_to_chw(normalize(rgb)))[None])
    return F.interpolate(maps, rgb.shape[:2], mode="bilinear", align_corners=False)[0].numpy()


def read_cue_mask(path):
    return read_index_png(path, "a ToyVOC cue mask (toy.toyvoc writes CueMasks/)")


def id_scores(model, voc12_root, list_spec, near, far):
    """Per (image, cue class) means on object, near-cue and far-cue pixels (lists)."""
    ids = load_img_name_list(voc12_root, list_spec)
    out = {"object": [], "cue_near": [], "cue_far": []}
    for img_id, label in zip(ids, load_image_labels(voc12_root, ids)):
        cue = read_cue_mask(os.path.join(voc12_root, "CueMasks", img_id + ".png"))
        gt = load_gt(voc12_root, img_id)
        maps = None
        for k in np.nonzero(label)[0]:
            own_cue = cue == k + 1
            if not own_cue.any() or not (gt == k + 1).any():
                continue
            if maps is None:
                maps = raw_maps(model, read_rgb(os.path.join(voc12_root, "JPEGImages", img_id + ".jpg")))
            distance = ndimage.distance_transform_edt(gt != k + 1)
            out["object"].append(maps[k][gt == k + 1].mean())
            for name, where in (("cue_near", own_cue & (distance <= near)), ("cue_far", own_cue & (distance > far))):
                if where.any():
                    out[name].append(maps[k][where].mean())
    return out


def ood_scores(model, ood_root):
    """Means on the cue pixels of each hard candidate, and its sigmoid score for the cue's class."""
    with open(os.path.join(ood_root, "manifest.json")) as f:
        hard = [e for e in json.load(f) if e["hard"]]
    if hard and "cue_mask" not in hard[0]:
        raise SystemExit(f"{ood_root}/manifest.json has no cue masks: regenerate the pool with toy.toyvoc")
    cue_means, probs = [], []
    for e in hard:
        k = CAT_LIST.index(e["cue"])
        maps = raw_maps(model, read_rgb(os.path.join(ood_root, e["path"])))
        cue = read_cue_mask(os.path.join(ood_root, e["cue_mask"]))
        cue_means.append(maps[k][cue == k + 1].mean())
        # GAP then the linear classifier = the mean of the class map (here of its resized copy: close)
        probs.append(1 / (1 + np.exp(-maps[k].mean())))
    return np.array(cue_means), np.array(probs)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--voc12_root", default="Data/ToyVOC")
    p.add_argument("--ood_root", default="WOoD_dataset/toy")
    p.add_argument("--weights", nargs="+", required=True, help="classifier state dicts (train_cam, train_wood)")
    p.add_argument("--list", default="train")
    p.add_argument("--width", type=int, default=16, help="--backbone_width the classifiers were trained with")
    p.add_argument("--near", type=float, default=16, help="cue pixels at most this far from the object (px)")
    p.add_argument("--far", type=float, default=32, help="cue pixels farther than this from the object (px)")
    a = p.parse_args()
    torch.set_num_threads(2)
    args = run_sample.parse_args(["--preset", "toy", "--device", "cpu", "--backbone_width", str(a.width)])
    for weights in a.weights:
        model = load_classifier(weights, args.backbone, args.backbone_width, args.device, "cam")
        with torch.inference_mode():
            ids = id_scores(model, a.voc12_root, a.list, a.near, a.far)
            ood_cue, ood_prob = ood_scores(model, a.ood_root)
        means = {k: float(np.mean(v)) for k, v in ids.items()}
        print(f"weights={weights} object={means['object']:+.2f} cue_near={means['cue_near']:+.2f} "
              f"cue_far={means['cue_far']:+.2f} ood_cue={ood_cue.mean():+.2f} "
              f"ood_fooled={(ood_prob > 0.5).mean():.2f}", flush=True)


if __name__ == "__main__":
    main()
