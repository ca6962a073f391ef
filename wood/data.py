"""Out-of-distribution (OoD) image lists and datasets (docs/method.md §1.3).

`ood_root` is a folder of images; `ood_list` a text file of paths relative to it, one per line.
Any image mode (grayscale, palette, RGBA, CMYK) is read as RGB. The "name" of an item is its
relative path as written in the list.
"""
import os

from torch.utils.data import Dataset

from misc import imutils
from misc.imutils import normalize
from misc.utils import InputError, require_dir, require_file


def _require_images(ood_root, paths):
    require_dir(ood_root, "the OoD images named by the OoD list (set --ood_root)")
    missing = [p for p in paths if not os.path.isfile(os.path.join(ood_root, p))]
    if missing:
        raise InputError(f"{len(missing)} OoD image(s) of the list missing, e.g. "
                         f"{os.path.join(ood_root, missing[0])}: the OoD list must name files under "
                         f"{ood_root}, relative to it")


def load_ood_list(ood_root, ood_list):
    """Relative paths listed in `ood_list` (blank lines skipped); every file must exist under `ood_root`."""
    require_file(ood_list, f"a text file of OoD image paths relative to {ood_root}, one per line")
    with open(ood_list) as f:
        paths = [line.strip() for line in f if line.strip()]
    if not paths:
        raise InputError(f"OoD list {ood_list} is empty: expected image paths relative to {ood_root}, "
                         f"one per line")
    _require_images(ood_root, paths)
    return paths


class _OoDDataset(Dataset):
    def __init__(self, ood_root, paths):
        self.ood_root = ood_root
        self.paths = list(paths)
        _require_images(ood_root, self.paths)

    def __len__(self):
        return len(self.paths)

    def read_image(self, idx):
        return imutils.read_rgb(os.path.join(self.ood_root, self.paths[idx]))


class OoDClassificationDataset(_OoDDataset):
    """Training recipe: random_resize_long -> normalize -> random_flip -> random_crop (fill 0) -> CHW."""

    def __init__(self, ood_root, paths, resize_long=(320, 640), crop_size=512):
        super().__init__(ood_root, paths)
        self.resize_long = tuple(resize_long)
        self.crop_size = crop_size

    def __getitem__(self, idx):
        img = imutils.random_resize_long(self.read_image(idx), self.resize_long[0], self.resize_long[1])
        img = imutils.random_flip(normalize(img))
        img = imutils.random_crop(img, None, self.crop_size, (0, 255))
        return {"name": self.paths[idx], "img": imutils.hwc_to_chw(img)}


class OoDFeatureDataset(_OoDDataset):
    """Prototype recipe: long side resized to exactly `long_side` (bicubic), normalize, no crop -> CHW."""

    def __init__(self, ood_root, paths, long_side=500):
        super().__init__(ood_root, paths)
        self.long_side = long_side

    def __getitem__(self, idx):
        img = imutils.random_resize_long(self.read_image(idx), self.long_side, self.long_side)
        return {"name": self.paths[idx], "img": imutils.hwc_to_chw(normalize(img))}
