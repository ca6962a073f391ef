"""train_seg (docs/method.md §8): augmentation, the MSC loss, parameter groups, the poly rule, resume, the finite
check."""
import os
import random
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import run_sample
from fakevoc import make_fake_voc
from misc import imutils
from misc.utils import InputError, load_torch
from net.deeplab_v2 import MEAN_BGR, deeplab_v2, msc_loss, param_groups, poly_lr
from step import train_seg
from voc12.segmentation import augment


def pytorch_poly_lrs(base_lr, iter_max, power, step_size, updates):
    """deeplab-pytorch's PolynomialLR.get_lr, stepped with epoch=t after every update t = 1, 2, ..."""
    lr, out = base_lr, []
    for t in range(1, updates + 1):
        if not (t == 0 or t % step_size != 0 or t > iter_max):
            lr = base_lr * (1 - float(t) / iter_max) ** power
        out.append(lr)
    return out


def test_poly_rule_matches_deeplab_pytorch_at_chosen_updates():
    reference = pytorch_poly_lrs(2.5e-4, 20000, 0.9, 10, 20005)
    for t in [1, 9, 10, 11, 19, 20, 1234, 19990, 19999, 20000, 20003]:
        assert poly_lr(2.5e-4, t, 20000, 0.9, 10) == pytest.approx(reference[t - 1], rel=1e-12), t
    assert poly_lr(2.5e-4, 9, 20000, 0.9, 10) == 2.5e-4
    assert poly_lr(2.5e-4, 10, 20000, 0.9, 10) == pytest.approx(2.5e-4 * (1 - 10 / 20000) ** 0.9)
    assert poly_lr(2.5e-4, 20000, 20000, 0.9, 10) == 0.0


def test_augment_pads_with_the_mean_crops_flips_and_subtracts_the_mean():
    image = np.full((20, 30, 3), 200, np.float32)
    label = np.ones((20, 30), np.uint8)
    x, y = augment(image, label, random.Random(0), (1.0,), 41)
    assert x.shape == (3, 41, 41) and y.shape == (41, 41) and y.dtype == np.int64
    # image pixels: 200 - mean; padding: the mean colour -> 0 after subtraction, label 255
    inside = y == 1
    assert inside.sum() == 20 * 30 and (y[~inside] == 255).all()
    assert np.allclose(x[:, inside], (200 - np.asarray(MEAN_BGR, np.float32))[:, None])
    assert np.allclose(x[:, ~inside], 0)


def test_augment_draws_in_deeplab_pytorchs_order():
    image = np.random.default_rng(0).uniform(0, 255, (50, 60, 3)).astype(np.float32)
    label = np.random.default_rng(1).integers(0, 21, (50, 60)).astype(np.uint8)
    x, y = augment(image, label, random.Random(5), (0.5, 1.5), 31)
    r = random.Random(5)
    s = r.choice((0.5, 1.5))
    h, w = int(50 * s), int(60 * s)
    lab = np.asarray(imutils.resize_label_nearest(label, (h, w)), np.int64)
    img = imutils.resize_bilinear(image, (h, w))
    top, left = r.randint(0, h - 31), r.randint(0, w - 31)
    img, lab = img[top:top + 31, left:left + 31], lab[top:top + 31, left:left + 31]
    if r.random() < 0.5:
        img, lab = img[:, ::-1], lab[:, ::-1]
    assert np.array_equal(y, lab)
    assert np.allclose(x, (img - np.asarray(MEAN_BGR, np.float32)).transpose(2, 0, 1))


def test_msc_loss_is_the_summed_cross_entropy_against_resized_labels():
    torch.manual_seed(0)
    model = deeplab_v2(21, None, width=4, n_blocks=(1, 1, 1, 1)).train()
    x = torch.randn(2, 3, 33, 33)
    labels = torch.randint(0, 21, (2, 33, 33))
    labels[:, :4] = 255
    outputs = model(x)
    loss = msc_loss(outputs, labels, iter_size=2)
    direct = 0
    for out in outputs:
        h, w = out.shape[2:]
        # PIL nearest picks source pixel floor((i + 0.5) * H / h)
        rows = np.floor((np.arange(h) + 0.5) * 33 / h).astype(int)
        cols = np.floor((np.arange(w) + 0.5) * 33 / w).astype(int)
        target = labels[:, rows][:, :, cols]
        direct = direct + F.cross_entropy(out, target, ignore_index=255)
    assert len(outputs) == 4
    assert torch.allclose(loss, direct / 2, atol=1e-6)


def test_param_groups_follow_deeplab_pytorch():
    model = deeplab_v2(21, None, width=4, n_blocks=(1, 1, 1, 1))
    groups = param_groups(model, 1.0, 5e-4)
    assert [g["lr"] for g in groups] == [1.0, 10.0, 20.0]
    assert [g["weight_decay"] for g in groups] == [5e-4, 5e-4, 0.0]
    convs = [m for n, m in model.base.named_modules() if isinstance(m, torch.nn.Conv2d) and "aspp" not in n]
    assert len(groups[0]["params"]) == len(convs) and len(groups[1]["params"]) == 4 == len(groups[2]["params"])
    grouped = {id(p) for g in groups for p in g["params"]}
    bn = model.base.layer2.block1.reduce.bn
    assert id(bn.weight) not in grouped


def _args(tmp_path, voc, *extra):
    return run_sample.parse_args(["--preset", "toy", "--voc12_root", voc["root"], "--work_dir", str(tmp_path / "w"),
                                  "--seg_init_weights", "none", "--seg_width", "4", "--device", "cpu",
                                  "--num_workers", "0", "--seg_label_dir",
                                  str(tmp_path / "VOC2012" / "SegmentationClassAug"), "--seg_crop_size", "33",
                                  "--seg_batch_size", "2", "--seg_iter_size", "2", "--seg_iter_max", "4",
                                  "--seg_lr", "0.01", "--seg_lr_step", "2", *extra])


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("segvoc")
    return make_fake_voc(root / "VOC2012", n_train=3, n_val=2, size=40, seed=0), root


def _small_blocks(monkeypatch):
    real = train_seg.deeplab_v2
    monkeypatch.setattr(train_seg, "deeplab_v2", lambda *a, **k: real(*a, **k, n_blocks=(1, 1, 1, 1)))


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(voc, tmp_path, monkeypatch):
    info, root = voc
    _small_blocks(monkeypatch)
    shutil.copytree(info["root"], tmp_path / "VOC2012")
    info = {**info, "root": str(tmp_path / "VOC2012")}
    torch.manual_seed(0)
    whole = _args(tmp_path, info, "--seg_name", "whole")
    train_seg.run(whole)
    # interrupted after update 3 (checkpoint every 1): stop the loop by failing the 4th update's first batch
    part = _args(tmp_path, info, "--seg_name", "part", "--seg_save_every", "1")
    calls = {"n": 0}
    real_loss = train_seg.msc_loss

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real_loss(*a, **k)
    monkeypatch.setattr(train_seg, "msc_loss", failing)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        train_seg.run(part)
    ckpt = load_torch(train_seg.checkpoint_path(part.seg_weights_name))
    assert int(ckpt["update"]) == 3
    monkeypatch.setattr(train_seg, "msc_loss", real_loss)
    other = _args(tmp_path, info, "--seg_name", "part", "--seg_save_every", "1", "--seg_lr", "0.02")
    with pytest.raises(InputError, match="is a checkpoint of another run"):  # never resumed by other inputs
        train_seg.run(other)
    torch.manual_seed(123)  # a different global seed: the stream must not depend on it
    train_seg.run(part)
    a, b = load_torch(whole.seg_weights_name), load_torch(part.seg_weights_name)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), k
    assert not torch.allclose(ckpt["model"]["base.aspp.c0.weight"], b["base.aspp.c0.weight"])  # update 4 ran
    train_seg.run(part)  # made by the same inputs: kept
    with pytest.raises(InputError, match="seg_lr"):  # made by other inputs: the step stops and says what differs
        train_seg.run(_args(tmp_path, info, "--seg_name", "part", "--seg_lr", "0.02"))


def test_non_finite_loss_stops_the_step(voc, tmp_path, monkeypatch):
    info, _ = voc
    _small_blocks(monkeypatch)
    shutil.copytree(info["root"], tmp_path / "VOC2012")
    info = {**info, "root": str(tmp_path / "VOC2012")}
    monkeypatch.setattr(train_seg, "msc_loss", lambda outputs, *a: outputs[0].sum() * float("nan"))
    args = _args(tmp_path, info)
    with pytest.raises(InputError, match="train_seg diverged: the loss is nan at epoch 1 iteration 1; nothing was "
                                         "saved"):
        train_seg.run(args)
    assert not (tmp_path / "w" / "deeplab.pth").exists()


def test_missing_labels_are_named(voc, tmp_path):
    info, _ = voc
    args = _args(tmp_path, info)
    args.seg_label_dir = str(tmp_path)
    with pytest.raises(InputError, match=r"5 of the 5 label PNGs of --seg_train_list missing from "):
        train_seg.run(args)


def test_presets_hold_spec_8_and_the_toys_scaled_values():
    a = run_sample.parse_args([])
    assert (a.seg_batch_size, a.seg_iter_size, a.seg_iter_max, a.seg_lr, a.seg_momentum, a.seg_weight_decay,
            a.seg_poly_power, a.seg_lr_step, a.seg_crop_size) == (5, 2, 20000, 2.5e-4, 0.9, 5e-4, 0.9, 10, 321)
    assert a.seg_scales == [0.5, 0.75, 1.0, 1.25, 1.5] and a.seg_width == 64 and a.seg_train_list == "train_aug"
    assert a.seg_label_dir == a.sem_seg_out_dir and a.seg_crf and not a.seg_crf_real_image
    assert a.seg_weights_name == os.path.join(a.work_dir, "deeplab.pth")
    t = run_sample.parse_args(["--preset", "toy"])
    # the toy changes sizes and counts only; the recipe's constants stay
    assert (t.seg_width, t.seg_crop_size, t.seg_iter_max) == (16, 97, 60)
    assert (t.seg_lr, t.seg_batch_size, t.seg_iter_size, t.seg_lr_step) == (2.5e-4, 5, 2, 10)
    assert t.seg_init_weights == t.pretrained
