"""PASCAL VOC 2012 lists, image-level labels, ground truth and datasets (docs/method.md §1.1-1.2), IRN style.

Names are image id strings such as "2007_000032" (IRN encodes them as ints; not needed here).
Every folder a dataset needs is checked when it is built, so a wrong `voc12_root` fails at once
with a message naming the folder, not later inside a DataLoader worker.
"""
import collections
import os
import xml.etree.ElementTree as ET

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from misc import imutils
from misc.imutils import normalize
from misc.utils import InputError, load_npz, require_dir, require_file, save_npz

CAT_LIST = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
            "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
            "train", "tvmonitor"]
N_CLASSES = 20
CAT_INDEX = {name: i for i, name in enumerate(CAT_LIST)}

SPLITS = ("train", "val", "trainval")
CLS_LABEL_CACHE = "cls_labels.npz"

_FOLDERS = {
    "JPEGImages": "the VOC 2012 images <id>.jpg",
    "Annotations": "the VOC 2012 XML annotations <id>.xml",
    "SegmentationClass": "the VOC 2012 ground-truth palette PNGs <id>.png",
    "SegmentationClassAug": "the SBD-augmented label PNGs <id>.png (SegmentationClassAug)",
    os.path.join("ImageSets", "Segmentation"): "the VOC 2012 split lists train.txt, val.txt, trainval.txt",
}

# in-memory label cache for roots where cls_labels.npz cannot be written: {abs root: {id: (mtime, labels)}}
_MEMORY_LABELS = {}


def voc_dir(voc12_root, name):
    """`voc12_root/name`, which must exist (InputError naming it and what belongs there otherwise)."""
    path = os.path.join(voc12_root, name)
    require_dir(voc12_root, "the VOC2012 folder of the devkit (JPEGImages, Annotations, ...); "
                            "set --voc12_root")
    return require_dir(path, _FOLDERS[name] + f" (is --voc12_root={voc12_root} the VOC2012 folder?)")


def img_path(voc12_root, img_id):
    return os.path.join(voc12_root, "JPEGImages", img_id + ".jpg")


# ---------------------------------------------------------------------------------------------- lists

def _read_id_file(path, what):
    require_file(path, what)
    ids = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            tokens = line.split()
            if not tokens:
                continue
            # plain "<id>" lines, or DeepLab-style "/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png"
            if len(tokens) == 1 and "/" not in tokens[0]:
                ids.append(tokens[0])
            elif len(tokens) <= 2 and all("/" in t for t in tokens):
                ids.append(os.path.splitext(os.path.basename(tokens[0]))[0])
            else:
                raise InputError(f"{path}, line {line_no}: cannot read {line.strip()!r}; expected one "
                                 f"image id per line (e.g. 2007_000032)")
    if not ids:
        raise InputError(f"image list {path} is empty: expected {what}")
    unique = list(dict.fromkeys(ids))
    if len(unique) < len(ids):
        repeated = next(i for i, n in collections.Counter(ids).items() if n > 1)
        print(f"warning: image list {path} names {len(ids) - len(unique)} id(s) more than once (e.g. {repeated}); "
              f"each is used once")
    return unique


def load_img_name_list(voc12_root, list_spec):
    """Image ids of a split name (train, val, trainval, train_aug) or of a text file of ids."""
    list_spec = os.fspath(list_spec)
    if list_spec in SPLITS:
        folder = voc_dir(voc12_root, os.path.join("ImageSets", "Segmentation"))
        return _read_id_file(os.path.join(folder, list_spec + ".txt"),
                             f"the VOC 2012 '{list_spec}' split, one image id per line")
    if list_spec == "train_aug":
        aug = voc_dir(voc12_root, "SegmentationClassAug")
        val = set(load_img_name_list(voc12_root, "val"))
        ids = sorted(os.path.splitext(f)[0] for f in os.listdir(aug)
                     if f.endswith(".png") and os.path.splitext(f)[0] not in val)
        if not ids:
            raise InputError(f"no label PNG outside the val split in {aug}: expected the SBD-augmented "
                             f"labels <id>.png (SegmentationClassAug) there")
        return ids
    if not os.path.isfile(list_spec):
        raise InputError(f"image list {list_spec} not found: expected a split name ({', '.join(SPLITS)}, "
                         f"train_aug) or a text file with one image id per line")
    return _read_id_file(list_spec, "one image id per line")


def _as_name_list(voc12_root, img_name_list):
    if isinstance(img_name_list, (str, os.PathLike)):
        return load_img_name_list(voc12_root, img_name_list)
    return [str(n) for n in img_name_list]


def require_images(voc12_root, ids):
    """InputError if any listed image is missing from JPEGImages or has no readable image header (checked
    once, up front: a bad file fails here, not in the middle of an epoch)."""
    voc_dir(voc12_root, "JPEGImages")
    missing = [i for i in ids if not os.path.isfile(img_path(voc12_root, i))]
    if missing:
        raise InputError(f"{len(missing)} listed image(s) missing from {os.path.join(voc12_root, 'JPEGImages')}, "
                         f"e.g. {img_path(voc12_root, missing[0])}: the image list does not match the images")
    for i in ids:
        require_image_header(img_path(voc12_root, i))


def require_image_header(path):
    """InputError naming `path` unless PIL recognises its header (the pixels are not decoded: fast)."""
    try:
        Image.open(path).close()  # opening parses the header only
    except Exception as e:
        raise InputError(f"{path} is not a readable image ({type(e).__name__}: {e}): replace the file or "
                         f"remove its id from the list") from None


# ------------------------------------------------------------------------------ image-level labels

def parse_image_label(xml_path):
    """Multi-hot (20,) float32 over every <object><name> of a VOC XML (parts' names are not objects)."""
    require_file(xml_path, "the VOC XML annotation of this image")
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as e:
        raise InputError(f"cannot parse {xml_path} ({e}); expected a VOC XML annotation") from None
    label = np.zeros(N_CLASSES, dtype=np.float32)
    for obj in root.findall("object"):
        name_el = obj.find("name")
        name = (name_el.text or "").strip() if name_el is not None else ""
        if name not in CAT_INDEX:
            raise InputError(f"{xml_path}: unknown object name {name!r}; expected one of the 20 VOC "
                             f"classes ({', '.join(CAT_LIST)})")
        label[CAT_INDEX[name]] = 1.0
    return label


def _mtime(path):
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        raise InputError(f"missing file {path}: expected the VOC XML annotation of this image") from None


def load_image_labels(voc12_root, ids):
    """(N, 20) float32 image-level labels of `ids`, cached in <voc12_root>/cls_labels.npz.

    The cache holds `ids`, `labels` and each XML's modification time (`mtimes`, ns): ids that are
    missing or whose XML changed are parsed again and the cache is rewritten (atomically). If the root
    is not writable the cache lives in memory for this process.
    """
    ann = voc_dir(voc12_root, "Annotations")
    cache_path = os.path.join(voc12_root, CLS_LABEL_CACHE)
    key = os.path.abspath(voc12_root)
    table = _MEMORY_LABELS.get(key)
    if table is None:
        table = {}
        if os.path.isfile(cache_path):
            try:
                data = load_npz(cache_path)
                table = {str(i): (int(m), lab) for i, m, lab in
                         zip(data["ids"], data["mtimes"], data["labels"].astype(np.float32))}
            except (InputError, KeyError, ValueError):
                table = {}  # unreadable or old cache: rebuild it
    mtimes = {i: _mtime(os.path.join(ann, i + ".xml")) for i in ids}
    stale = [i for i in dict.fromkeys(ids) if i not in table or table[i][0] != mtimes[i]]
    for i in stale:
        table[i] = (mtimes[i], parse_image_label(os.path.join(ann, i + ".xml")))
    if stale:
        cached_ids = sorted(table)
        try:
            save_npz(cache_path, ids=np.array(cached_ids, dtype=str),
                     mtimes=np.array([table[i][0] for i in cached_ids], dtype=np.int64),
                     labels=np.stack([table[i][1] for i in cached_ids]).astype(np.float32))
            _MEMORY_LABELS.pop(key, None)
        except OSError:  # read-only dataset folder: keep the table for this process only
            _MEMORY_LABELS[key] = table
    return np.stack([table[i][1] for i in ids]).astype(np.float32) if ids else \
        np.zeros((0, N_CLASSES), np.float32)


# ----------------------------------------------------------------------------------- ground truth

GT_VALUES = np.array(list(range(21)) + [255])   # background, the 20 classes, void


def read_index_png(path, what):
    """A single-channel PNG ("P" palette or "L") as its (H, W) uint8 indices, never its colours."""
    require_file(path, what)
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            arr = np.asarray(img) if mode in ("P", "L") else None
    except Exception as e:
        raise InputError(f"cannot read {path} ({type(e).__name__}: {e}); expected {what}") from None
    if arr is None:
        raise InputError(f"{path} is a {mode} image; expected {what} (a palette or single-channel PNG "
                         f"whose values are class indices, not colours)")
    return np.ascontiguousarray(arr, dtype=np.uint8)


def load_gt(voc12_root, img_id):
    """(H, W) uint8 class indices of SegmentationClass/<id>.png (255 = ignore)."""
    folder = voc_dir(voc12_root, "SegmentationClass")
    path = os.path.join(folder, img_id + ".png")
    gt = read_index_png(path, "a VOC ground-truth palette PNG")
    bad = np.setdiff1d(np.unique(gt), GT_VALUES)
    if bad.size:
        raise InputError(f"{path} holds the value(s) {bad.tolist()}: a ground truth has classes 0-20 and 255 "
                         f"(void); is it a colour PNG saved with another palette, or another dataset's label?")
    return gt


# ---------------------------------------------------------------------------------------- datasets

class VOC12ImageDataset(Dataset):
    """IRN's generic image dataset: resize_long -> rescale -> normalize -> flip -> crop -> CHW."""

    def __init__(self, img_name_list, voc12_root, resize_long=None, rescale=None, img_normal=normalize,
                 hor_flip=False, crop_size=None, crop_method=None, to_torch=True):
        if crop_size and crop_method not in ("random", "top_left"):
            raise ValueError(f"crop_method must be 'random' or 'top_left', got {crop_method!r}")
        self.voc12_root = voc12_root
        self.img_name_list = _as_name_list(voc12_root, img_name_list)
        require_images(voc12_root, self.img_name_list)
        self.resize_long = resize_long
        self.rescale = rescale
        self.img_normal = img_normal
        self.hor_flip = hor_flip
        self.crop_size = crop_size
        self.crop_method = crop_method
        self.to_torch = to_torch

    def __len__(self):
        return len(self.img_name_list)

    def read_image(self, name):
        return imutils.read_rgb(img_path(self.voc12_root, name))

    def __getitem__(self, idx):
        name = self.img_name_list[idx]
        img = self.read_image(name)
        if self.resize_long:
            img = imutils.random_resize_long(img, self.resize_long[0], self.resize_long[1])
        if self.rescale:
            img = imutils.random_scale(img, None, self.rescale)
        if self.img_normal:
            img = self.img_normal(img)
        if self.hor_flip:
            img = imutils.random_flip(img)
        if self.crop_size:
            if self.crop_method == "random":
                img = imutils.random_crop(img, None, self.crop_size, (0, 255))
            else:
                img = imutils.top_left_crop(img, self.crop_size, 0)
        img = imutils.hwc_to_chw(img) if self.to_torch else np.ascontiguousarray(img)
        return {"name": name, "img": img}


class VOC12ClassificationDataset(VOC12ImageDataset):
    """Adds the (20,) float32 image-level label (a torch tensor, as IRN)."""

    def __init__(self, img_name_list, voc12_root, **kwargs):
        super().__init__(img_name_list, voc12_root, **kwargs)
        self.label_list = load_image_labels(voc12_root, self.img_name_list)

    @classmethod
    def for_training(cls, img_name_list, voc12_root, resize_long=(320, 640), crop_size=512):
        """random_resize_long -> normalize -> random_flip -> random_crop (docs/method.md §1.2 training recipe)."""
        return cls(img_name_list, voc12_root, resize_long=tuple(resize_long), hor_flip=True,
                   crop_size=crop_size, crop_method="random")

    @classmethod
    def for_validation(cls, img_name_list, voc12_root, crop_size=512):
        """normalize -> top_left_crop (docs/method.md §1.2 validation recipe)."""
        return cls(img_name_list, voc12_root, crop_size=crop_size, crop_method="top_left")

    def __getitem__(self, idx):
        out = super().__getitem__(idx)
        out["label"] = torch.from_numpy(self.label_list[idx])
        return out


class VOC12ClassificationDatasetMSF(VOC12ClassificationDataset):
    """Multi-scale + flip inference: "img" is a list over scales of (2, 3, h, w) float32 [x, x flipped]."""

    def __init__(self, img_name_list, voc12_root, scales=(1.0,), img_normal=normalize):
        super().__init__(img_name_list, voc12_root, img_normal=img_normal)
        self.scales = tuple(scales)

    def __getitem__(self, idx):
        name = self.img_name_list[idx]
        img = self.read_image(name)
        ms_img_list = []
        for s in self.scales:
            s_img = img if s == 1 else imutils.rescale(img, s, 3)
            s_img = imutils.hwc_to_chw(self.img_normal(s_img))
            ms_img_list.append(np.stack([s_img, np.flip(s_img, -1)], axis=0))
        return {"name": name, "img": ms_img_list, "size": (img.shape[0], img.shape[1]),
                "label": torch.from_numpy(self.label_list[idx])}


class VOC12SegmentationDataset(Dataset):
    """Image + single-channel label PNG from `label_dir` (IRN's; the affinity dataset subclasses it).

    __getitem__: random_scale (when `rescale` is given) -> normalize -> flip -> crop (fills 0 / 255)
    -> CHW image; returns {"name", "img": (3, s, s) float32, "label": (s, s) uint8}. Subclasses
    can override `load_label` (how a label map is read) or post-process the returned dict.
    """

    def __init__(self, img_name_list, label_dir, crop_size, voc12_root, rescale=None, img_normal=normalize,
                 hor_flip=False, crop_method="random"):
        if crop_method not in ("random", "top_left"):
            raise ValueError(f"crop_method must be 'random' or 'top_left', got {crop_method!r}")
        self.voc12_root = voc12_root
        self.label_dir = label_dir
        self.img_name_list = _as_name_list(voc12_root, img_name_list)
        require_images(voc12_root, self.img_name_list)
        require_dir(label_dir, "the label PNGs <id>.png of the images (written by the step before)")
        missing = [n for n in self.img_name_list if not os.path.isfile(self.label_path(n))]
        if missing:
            raise InputError(f"{len(missing)} label PNG(s) missing from {label_dir}, e.g. "
                             f"{self.label_path(missing[0])}: run the step that writes them first")
        self.crop_size = crop_size
        self.rescale = rescale
        self.img_normal = img_normal
        self.hor_flip = hor_flip
        self.crop_method = crop_method

    def __len__(self):
        return len(self.img_name_list)

    def label_path(self, name):
        return os.path.join(self.label_dir, name + ".png")

    def load_label(self, name):
        return read_index_png(self.label_path(name), "a single-channel label PNG")

    def __getitem__(self, idx):
        name = self.img_name_list[idx]
        img = imutils.read_rgb(img_path(self.voc12_root, name))
        label = self.load_label(name)
        if label.shape != img.shape[:2]:
            raise InputError(f"{self.label_path(name)} is {label.shape[1]}x{label.shape[0]} but its image "
                             f"is {img.shape[1]}x{img.shape[0]}; labels must match their images")
        if self.rescale:
            img, label = imutils.random_scale(img, label, self.rescale)
        if self.img_normal:
            img = self.img_normal(img)
        if self.hor_flip:
            img, label = imutils.random_flip(img, label)
        if self.crop_method == "random":
            img, label = imutils.random_crop(img, label, self.crop_size, (0, 255))
        else:
            img = imutils.top_left_crop(img, self.crop_size, 0)
            label = imutils.top_left_crop(label, self.crop_size, 255)
        return {"name": name, "img": imutils.hwc_to_chw(img), "label": np.ascontiguousarray(label)}
