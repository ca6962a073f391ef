"""Confident IR labels (docs/method.md §5.1): misc/crf.py and step/cam_to_ir_label.py."""
import argparse
import os

import numpy as np
import pytest
from PIL import Image

from misc.crf import crf_inference_label
from misc.utils import InputError, save_npz
from step import cam_to_ir_label as c2ir


def test_fg_bg_combination_rule():
    fg = np.array([[0, 1, 2, 0], [0, 0, 3, 15]])
    bg = np.array([[0, 1, 0, 2], [15, 0, 3, 15]])
    # ir = fg; ir[fg == 0] = 255; ir[fg + bg == 0] = 0
    expected = np.array([[0, 1, 2, 255], [255, 0, 3, 15]], np.uint8)
    out = c2ir.combine_fg_bg(fg, bg)
    assert out.dtype == np.uint8 and np.array_equal(out, expected)
    # the literal rule, pixel by pixel, on random maps
    rng = np.random.default_rng(0)
    fg, bg = rng.choice([0, 0, 3, 7], size=(2, 9, 11))
    out = c2ir.combine_fg_bg(fg, bg)
    for i in np.ndindex(fg.shape):
        assert out[i] == (0 if fg[i] == 0 and bg[i] == 0 else 255 if fg[i] == 0 else fg[i])


def test_seed_index_ties_go_to_the_background():
    high_res = np.array([[[0.3, 0.1, 0.5]], [[0.2, 0.3, 0.6]]], np.float32)
    assert c2ir.seed_index(high_res, 0.3).tolist() == [[0, 0, 2]]  # 0.3 ties with the background
    assert c2ir.seed_index(high_res, 0.05).tolist() == [[1, 2, 2]]
    assert c2ir.seed_index(high_res, 0.7).tolist() == [[0, 0, 0]]


def _scene():
    """Four flat colour blocks; class 3's CAM is high on the left, middling in the middle, low on the
    right; class 14's CAM is high on a top-right block of its own colour."""
    h, w = 24, 36
    img = np.zeros((h, w, 3), np.uint8)
    img[:, :12] = (200, 30, 30)
    img[:, 12:24] = (30, 200, 30)
    img[:, 24:] = (30, 30, 200)
    img[:12, 24:] = (220, 220, 40)
    high_res = np.zeros((2, h, w), np.float32)
    high_res[0, :, :12], high_res[0, :, 12:24], high_res[0, :, 24:] = 0.9, 0.2, 0.05
    high_res[1, :12, 24:] = 0.8
    expected = np.zeros((h, w), np.uint8)
    expected[:, :12] = 4          # above both thresholds: confident class 3
    expected[:, 12:24] = 255      # between 0.15 and 0.30: unsure
    expected[:12, 24:] = 15       # class 14
    return img, high_res, np.array([3, 14]), expected


def test_ir_label_on_a_crafted_scene():
    img, high_res, keys, expected = _scene()
    out = c2ir.ir_label(img, high_res, keys, fg_thres=0.30, bg_thres=0.15)
    assert out.dtype == np.uint8 and np.array_equal(out, expected)


def test_crf_follows_the_image():
    """A label patch that disagrees with a flat colour region is removed by the pairwise terms; labels
    that follow colour edges are kept."""
    img = np.zeros((20, 20, 3), np.uint8)
    img[:, 10:] = 255
    labels = np.zeros((20, 20), np.int64)
    labels[:, 10:] = 1
    noisy = labels.copy()
    noisy[4:6, 3:5] = 1
    out = crf_inference_label(img, noisy, n_labels=2)
    assert np.array_equal(out, labels)
    assert np.array_equal(crf_inference_label(img, labels, n_labels=3), labels)
    assert np.array_equal(crf_inference_label(img, np.zeros((20, 20), np.int64), n_labels=1), np.zeros((20, 20)))
    with pytest.raises(ValueError, match="differ in size"):
        crf_inference_label(img, labels[:5], n_labels=2)


def _args(tmp_path, voc, **kw):
    args = dict(voc12_root=voc["root"], infer_list="train", ir_label_cam_dir=str(tmp_path / "cams"),
                ir_label_out_dir=str(tmp_path / "ir_label"), conf_fg_thres=0.30, conf_bg_thres=0.15,
                num_workers=2)
    args.update(kw)
    return argparse.Namespace(**args)


def _write_cams(args, voc, ids):
    """high_res from the ground truth: 0.9 on the object, 0.2 on its void border, 0.02 elsewhere."""
    for img_id in ids:
        gt = voc["gt"][img_id]
        keys = np.nonzero(voc["labels"][img_id])[0]
        high_res = np.full((keys.size,) + gt.shape, 0.02, np.float32)
        for i, k in enumerate(keys):
            high_res[i][gt == k + 1] = 0.9
            high_res[i][gt == 255] = 0.2
        save_npz(os.path.join(args.ir_label_cam_dir, img_id + ".npz"), keys=keys, high_res=high_res,
                 cam=high_res[:, ::4, ::4])


def test_run_writes_resumable_single_channel_labels(tmp_path):
    from fakevoc import make_fake_voc
    from misc.imutils import read_rgb
    from voc12.dataloader import img_path
    voc = make_fake_voc(tmp_path / "VOC2012", n_train=3, n_val=1, sizes=[(40, 56), (48, 48)], seed=0)
    args = _args(tmp_path, voc)
    _write_cams(args, voc, voc["train"])
    c2ir.run(args)
    for img_id in voc["train"]:
        path = os.path.join(args.ir_label_out_dir, img_id + ".png")
        with Image.open(path) as im:
            assert im.mode == "L"
            out = np.asarray(im)
        cams = np.load(os.path.join(args.ir_label_cam_dir, img_id + ".npz"))
        expected = c2ir.ir_label(read_rgb(img_path(voc["root"], img_id)), cams["high_res"], cams["keys"],
                                 0.30, 0.15)
        assert np.array_equal(out, expected)
        gt = voc["gt"][img_id]
        # the object cores are confident foreground of their class, the far background confident 0
        assert set(np.unique(out)) <= {0, 255} | set((cams["keys"] + 1).tolist())
        for k in cams["keys"]:
            assert (out[gt == k + 1] == k + 1).mean() > 0.8
        assert (out[gt == 0] == 0).mean() > 0.8
    # resumable
    first = os.path.join(args.ir_label_out_dir, voc["train"][0] + ".png")
    os.utime(first, (1, 1))
    c2ir.run(_args(tmp_path, voc, num_workers=0))
    assert os.stat(first).st_mtime == 1


def test_run_names_bad_inputs(tmp_path):
    from fakevoc import make_fake_voc
    voc = make_fake_voc(tmp_path / "VOC2012", n_train=2, n_val=1, seed=1)
    args = _args(tmp_path, voc, num_workers=0)
    with pytest.raises(InputError, match=str(tmp_path / "cams")):
        c2ir.run(args)
    _write_cams(args, voc, voc["train"][:1])
    missing = os.path.join(args.ir_label_cam_dir, voc["train"][1] + ".npz")
    with pytest.raises(InputError, match=f"1 of the 2 CAM files of --infer_list missing from {args.ir_label_cam_dir} "
                                         rf"\({voc['train'][1]}.npz\)"):
        c2ir.run(args)
    _write_cams(args, voc, voc["train"])
    bad = missing
    keys = np.nonzero(voc["labels"][voc["train"][1]])[0]  # the right classes, maps of the wrong size
    save_npz(bad, keys=keys, high_res=np.zeros((keys.size, 10, 10), np.float32))
    with pytest.raises(InputError, match=f"{bad}: high_res"):
        c2ir.run(args)
    assert not os.path.exists(os.path.join(args.ir_label_out_dir, voc["train"][1] + ".png"))
