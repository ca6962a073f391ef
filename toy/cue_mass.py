"""How much of the CAM mass falls on ToyVOC's spurious-cue pixels (the problem W-OoD addresses).

    python toy/cue_mass.py --voc12_root Data/ToyVOC --cam_dir result/toy/baseline_cam [--list train]

For every image of the list and every label class k of its CAM file, the class map `high_res[k]` (as
make_cam / make_advcam save it, max-normalised) is split into the mass on pixels of class k's own cue
(`CueMasks/<id>.png == k + 1`), on any cue, and elsewhere. Printed: the share of the total mass that lies
on cue pixels (own cue / any cue), summed over all images, and the same per class.
"""
import argparse
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from misc.utils import load_npz  # noqa: E402
from voc12.dataloader import CAT_LIST, load_img_name_list  # noqa: E402


def cue_mass(high_res, keys, cue_mask):
    """(mass on own cue, mass on any cue, total mass) per label class: arrays of len(keys)."""
    cams = np.maximum(high_res, 0).astype(np.float64)
    own = np.array([cams[i][cue_mask == k + 1].sum() for i, k in enumerate(keys)])
    any_cue = (cams * (cue_mask > 0)).reshape(len(keys), -1).sum(1)
    return own, any_cue, cams.reshape(len(keys), -1).sum(1)


def measure(voc12_root, cam_dir, list_spec="train"):
    totals = np.zeros((len(CAT_LIST), 3))
    for img_id in load_img_name_list(voc12_root, list_spec):
        data = load_npz(os.path.join(cam_dir, img_id + ".npz"))
        cue = np.asarray(Image.open(os.path.join(voc12_root, "CueMasks", img_id + ".png")))
        for k, o, a, t in zip(data["keys"], *cue_mass(data["high_res"], data["keys"], cue)):
            totals[k] += (o, a, t)
    return totals


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--voc12_root", default="Data/ToyVOC")
    p.add_argument("--cam_dir", required=True)
    p.add_argument("--list", default="train")
    a = p.parse_args()
    totals = measure(a.voc12_root, a.cam_dir, a.list)
    for k in np.nonzero(totals[:, 2])[0]:
        print(f"{CAT_LIST[k]:>12s}: own-cue share {totals[k, 0] / totals[k, 2]:.3f}  "
              f"any-cue share {totals[k, 1] / totals[k, 2]:.3f}")
    own, any_cue, total = totals.sum(0)
    print(f"cam_dir={a.cam_dir} own_cue_share={own / total:.3f} any_cue_share={any_cue / total:.3f}")


if __name__ == "__main__":
    main()
