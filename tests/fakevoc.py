"""A tiny fake PASCAL VOC 2012 folder for tests (the layout of docs/method.md §1.1, a few small images).

    from fakevoc import make_fake_voc
    info = make_fake_voc(tmp_path / "VOC2012", n_train=4, n_val=2, size=64, seed=0)

Each image shows one or two classes (of the first `n_classes` VOC classes) as coloured rectangles on a
noisy background; the ground truth marks them with `class + 1`, a 1-pixel void (255) border around each
object, and background 0. Written: JPEGImages/<id>.jpg, Annotations/<id>.xml, SegmentationClass/<id>.png
(palette PNG), SegmentationObject/<id>.png (palette PNG: object k of the image is k, background 0, the
same void border 255), SegmentationClassAug/<id>.png (single-channel PNG) for every id, and
ImageSets/Segmentation/{train,val,trainval}.txt. `n_aug_only` extra ids have only an Aug label, so
`train_aug` = train + those ids. Images are `size x size` unless `sizes` gives a list of (H, W) that is
cycled over the images (to test non-square, non-multiple-of-16 shapes).

Returns a dict: root, train, val, aug_only (id lists), labels {id: (20,) float32 multi-hot},
gt {id: (H, W) uint8}.
"""
import argparse
import os
import shutil

import numpy as np
from PIL import Image

import run_sample
from misc.utils import palette_voc

CAT_LIST = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
            "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
            "train", "tvmonitor"]


def _xml(img_id, h, w, objects):
    parts = [f"<annotation><folder>VOC2012</folder><filename>{img_id}.jpg</filename>",
             f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>"]
    for cls, (y0, x0, y1, x1) in objects:
        parts.append(f"<object><name>{CAT_LIST[cls]}</name><difficult>0</difficult><truncated>0</truncated>"
                     f"<bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax>"
                     f"</bndbox></object>")
    parts.append("</annotation>")
    return "\n".join(parts)


def _draw(rng, h, w, classes):
    """An RGB uint8 image, its ground truth and its object map (VOC's SegmentationObject) for the classes."""
    img = rng.integers(0, 60, size=(h, w, 3)).astype(np.int32) + 40
    gt = np.zeros((h, w), np.uint8)
    instances = np.zeros((h, w), np.uint8)
    objects = []
    for cls in classes:
        bh, bw = int(rng.integers(h // 4, h // 2 + 1)), int(rng.integers(w // 4, w // 2 + 1))
        y0, x0 = int(rng.integers(1, h - bh)), int(rng.integers(1, w - bw))
        y1, x1 = y0 + bh, x0 + bw
        colour = np.array([(37 * (cls + 1)) % 200 + 55, (91 * (cls + 1)) % 200 + 55, (53 * (cls + 3)) % 200 + 55])
        img[y0:y1, x0:x1] = colour + rng.integers(-10, 11, size=(bh, bw, 3))
        gt[y0 - 1:y1 + 1, x0 - 1:x1 + 1] = 255  # void border, overwritten inside by the object
        gt[y0:y1, x0:x1] = cls + 1
        instances[y0 - 1:y1 + 1, x0 - 1:x1 + 1] = 255
        instances[y0:y1, x0:x1] = len(objects) + 1
        objects.append((cls, (y0, x0, y1, x1)))
    return np.clip(img, 0, 255).astype(np.uint8), gt, instances, objects


def make_fake_voc(root, n_train=4, n_val=2, size=64, seed=0, n_aug_only=2, n_classes=3, sizes=None):
    root = os.fspath(root)
    for sub in ["JPEGImages", "Annotations", "SegmentationClass", "SegmentationObject", "SegmentationClassAug",
                os.path.join("ImageSets", "Segmentation")]:
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    rng = np.random.default_rng(seed)
    n_total = n_train + n_val + n_aug_only
    ids = [f"2007_{i + 1:06d}" for i in range(n_total)]
    info = {"root": root, "train": ids[:n_train], "val": ids[n_train:n_train + n_val],
            "aug_only": ids[n_train + n_val:], "labels": {}, "gt": {}}
    palette = list(palette_voc().reshape(-1))
    for k, img_id in enumerate(ids):
        h, w = sizes[k % len(sizes)] if sizes else (size, size)
        n_obj = 1 + int(rng.integers(0, 2))
        classes = sorted(rng.choice(n_classes, size=min(n_obj, n_classes), replace=False).tolist())
        img, gt, instances, objects = _draw(rng, h, w, classes)
        Image.fromarray(img).save(os.path.join(root, "JPEGImages", img_id + ".jpg"), quality=95)
        with open(os.path.join(root, "Annotations", img_id + ".xml"), "w") as f:
            f.write(_xml(img_id, h, w, objects))
        pimg = Image.new("P", (w, h))
        pimg.putdata(gt.reshape(-1).tolist())
        pimg.putpalette(palette)
        pimg.save(os.path.join(root, "SegmentationClass", img_id + ".png"))
        objects_png = Image.fromarray(instances)
        objects_png.putpalette(palette)  # "L" -> "P", as VOC's palette PNGs
        objects_png.save(os.path.join(root, "SegmentationObject", img_id + ".png"))
        Image.fromarray(gt).save(os.path.join(root, "SegmentationClassAug", img_id + ".png"))
        label = np.zeros(len(CAT_LIST), np.float32)
        label[classes] = 1
        info["labels"][img_id], info["gt"][img_id] = label, gt
    lists = {"train": info["train"], "val": info["val"], "trainval": info["train"] + info["val"]}
    for name, split in lists.items():
        with open(os.path.join(root, "ImageSets", "Segmentation", name + ".txt"), "w") as f:
            f.write("\n".join(split) + "\n")
    return info


def make_voc_sized_ir_labels(root, n_images):
    """A fake VOC of n_images 500 x 375 train images (20 classes) under <root>/VOC2012 and their IR labels
    under <root>/ir_label (single-channel PNGs, values 0..20 and 255: the fake ground truths); returns both
    folders. The inputs of train_irn at VOC's image size (bench/loader_memory.py, bench/irn_determinism.py)."""
    root = os.fspath(root)
    voc, labels = os.path.join(root, "VOC2012"), os.path.join(root, "ir_label")
    info = make_fake_voc(voc, n_train=n_images, n_val=1, n_aug_only=0, n_classes=20, sizes=[(375, 500)], seed=0)
    os.makedirs(labels)
    for img_id in info["train"]:
        shutil.copy(os.path.join(voc, "SegmentationClassAug", img_id + ".png"), os.path.join(labels, img_id + ".png"))
    return voc, labels


def make_ood_pool(folder, n, list_file):
    """`n` random 64 x 48 JPEGs o0.jpg ... in `folder` (made), listed in `list_file`: a pool of OoD candidates;
    returns their names."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    names = [f"o{i}.jpg" for i in range(n)]
    for name in names:
        Image.fromarray(rng.randint(0, 256, (48, 64, 3)).astype(np.uint8)).save(folder / name)
    list_file.write_text("".join(name + "\n" for name in names))
    return names


def random_bn_statistics(model):
    """Give every BatchNorm of `model` non-trivial running statistics (in place, from torch's generator), so
    that frozen-BN nets built from random weights do not have the identity BatchNorm; returns `model`."""
    import torch
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 1.5)
                m.running_mean.normal_(0, 0.1)
    return model


def driver_args(work_dir=None, **values):
    """What a step's run(args) gets from the driver: its parser's defaults (paper preset, CPU, outputs under
    `work_dir`) with `values` set on top, so a test names only what it changes. Without `work_dir` the
    output folders lie under /dev/null, where any write fails: for tests of functions that write nothing."""
    work_dir = work_dir or os.path.join(os.devnull, "no-outputs")
    args = run_sample.parse_args(["--device", "cpu", "--work_dir", str(work_dir)])
    return argparse.Namespace(**{**vars(args), **values})


def advcam_rule(args):
    """The positional constants of misc.advcam.group_advcam / image_advcam, from a driver namespace."""
    return args.adv_iter, args.AD_coeff, args.AD_stepsize, args.score_th


def wood_constants(args):
    """wood.losses.WoodConstants from a driver namespace."""
    from wood.losses import WoodConstants
    return WoodConstants(args.ood_adv_step, args.ood_dist_topk, args.ood_mask_class, args.distance_lambda,
                         args.ood_coeff)


# A tiny ToyVOC (toy.toyvoc flags) and the driver flags of a tiny whole run on it (test_cuda, test_distributed)
TINY_TOYVOC = ["--n_train_aug", "12", "--n_train", "8", "--n_val", "4", "--n_ood_hard", "8",
               "--n_ood_easy", "8", "--long_min", "64", "--long_max", "80"]


def tiny_flags(root):
    """Driver flags of a tiny run: paths under `root`, small sizes, one epoch each, width-8 backbone."""
    voc, ood, sess = root / "voc", root / "ood", root / "sess"
    return ["--voc12_root", str(voc), "--ood_pool_root", str(ood), "--ood_pool_list", str(ood / "candidates.txt"),
            "--ood_root", str(ood), "--pretrained", "none", "--backbone_width", "8",
            "--cam_weights_name", str(sess / "cam.pth"), "--wood_weights_name", str(sess / "wood.pth"),
            "--irn_weights_name", str(sess / "irn.pth"), "--num_workers", "0",
            "--seg_init_weights", "none", "--seg_width", "8", "--seg_iter_max", "2", "--seg_save_every", "1",
            "--seg_crop_size", "33",
            "--cam_batch_size", "4", "--cam_num_epoches", "1", "--cam_resize_long", "48", "80",
            "--cam_crop_size", "64", "--cam_scales", "1.0", "0.5",
            "--mine_th", "0.0", "--wood_batch_size", "4", "--ood_batch_size", "4", "--wood_num_epoches", "1",
            "--cluster_K", "3", "--ood_long_side", "64", "--select_every", "1", "--select_scales", "1.0", "0.5",
            "--adv_iter", "2", "--irn_crop_size", "64", "--irn_batch_size", "4", "--irn_num_epoches", "1"]
