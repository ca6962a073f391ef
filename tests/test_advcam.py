"""step/make_advcam.py: the batched AdvCAM equals a literal per-class, per-scale loop of SPEC 4.6."""
import argparse
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from misc.utils import InputError, load_npz, save_torch
from net.resnet50_cam import Net
from step import make_advcam
from step.make_advcam import (accumulation_multiplier, adv_iterations, advcam_regions, image_advcam,
                              scale_processing_order)
from voc12.dataloader import VOC12ClassificationDatasetMSF

torch.set_num_threads(1)  # the test machine's 2 cores are shared: more threads only contend


def test_iteration_rules():
    assert [adv_iterations(27, False), adv_iterations(27, True)] == [27, 13]
    assert [adv_iterations(n, True) for n in (3, 5, 6, 8, 10, 11, 12)] == [3, 5, 5, 5, 5, 5, 6]
    assert scale_processing_order(4) == [1, 0, 2, 3] and scale_processing_order(1) == [0]
    assert scale_processing_order(2) == [1, 0]
    assert accumulation_multiplier(27) == 2.0 and accumulation_multiplier(10) == 1.0


def literal_advcam(model, pair, c, n_iter, ad_coeff, step_size, score_th):
    """SPEC 4.6 to the letter for one class and one MSF pair (2, 3, h, w): the accumulated region."""
    x = pair.clone()
    acc, init = None, None
    n_classes = model.classifier.weight.shape[0]
    for i in range(n_iter):
        x = x.detach().requires_grad_(True)
        feat = model.stage4_features(x)
        A = F.conv2d(feat, model.classifier.weight)
        v = F.relu(A).sum(dim=(2, 3))
        G, = torch.autograd.grad(v[0, c] + v[1, c], feat, retain_graph=True)
        w = (G.sum(dim=(2, 3)) / ((G > 0).sum() + 1e-12)).detach()
        R = F.relu((feat * w[:, :, None, None]).sum(dim=1, keepdim=True))
        region = R[0, 0] + R[1, 0].flip(-1)
        if i == 0:
            init = region.detach()
        acc = region.detach() if acc is None else acc + region.detach()
        g = F.relu(A).mean(dim=(2, 3))
        others = 0
        for b in range(2):
            for k in range(n_classes):
                if k != c:
                    others = others + g[b, k]
        loss_cls = g[0, c] + g[1, c] - others
        mask = region / region.max() > score_th
        loss_ad = ((region - init).abs() * mask).sum()
        loss = loss_cls - ad_coeff * loss_ad
        gx, = torch.autograd.grad(loss, x)
        x = torch.clamp(x + step_size * gx / (gx.abs().max() + 1e-12), x.min().item(), x.max().item()).detach()
    return acc, init


@pytest.fixture(scope="module")
def model64():
    torch.manual_seed(0)
    model = Net(width=8, frozen_bn=True, detach_stage2=False).double().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def pair_of(img):
    return torch.stack([img, img.flip(-1)])


def test_batched_regions_equal_literal_loop(model64):
    g = torch.Generator().manual_seed(1)
    pair = pair_of(torch.randn(3, 64, 64, generator=g, dtype=torch.float64))
    classes, n_iter = [0, 3, 7], 4
    got = advcam_regions(model64, pair, classes, n_iter, 7.0, 0.08, 0.5)
    assert got.shape == (3, 4, 4)
    for row, c in enumerate(classes):
        expected, init = literal_advcam(model64, pair, c, n_iter, 7.0, 0.08, 0.5)
        assert (expected > 0).any()
        assert not torch.allclose(expected, n_iter * init)  # the image moved: later regions differ
        torch.testing.assert_close(got[row], expected, rtol=1e-10, atol=1e-12)


def literal_image_advcam(model, msf_imgs, size, keys, adv_iter, ad_coeff, step_size, score_th):
    """Per scale in the order 0.5, 1.0, 1.5 of the list (1.0, 0.5, 1.5), per class, then SPEC 4.4."""
    height, width = size
    strided = ((height - 1) // 4 + 1, (width - 1) // 4 + 1)
    up = (((height - 1) // 16 + 1) * 16, ((width - 1) // 16 + 1) * 16)
    cam, high_res = 0, 0
    for position in (1, 0, 2):
        if position == 1:
            n_iter = adv_iter // 2 if adv_iter > 10 else (adv_iter if adv_iter < 6 else 5)
        else:
            n_iter = adv_iter
        maps = torch.stack([literal_advcam(model, msf_imgs[position], c, n_iter, ad_coeff, step_size, score_th)[0]
                            for c in keys])
        maps = maps * (2 if adv_iter > 10 else 1)
        cam = cam + F.interpolate(maps[None], strided, mode="bilinear", align_corners=False)[0]
        high_res = high_res + F.interpolate(maps[None], up, mode="bilinear", align_corners=False)[0]
    high_res = high_res[:, :height, :width]
    cam = cam / (cam.amax(dim=(1, 2), keepdim=True) + 1e-5)
    high_res = high_res / (high_res.amax(dim=(1, 2), keepdim=True) + 1e-5)
    return cam, high_res


def test_image_advcam_equals_literal_per_class_per_scale(model64):
    g = torch.Generator().manual_seed(2)
    height, width = 52, 60
    img = torch.randn(3, height, width, generator=g, dtype=torch.float64)
    msf = []
    for s in (1.0, 0.5, 1.5):
        scaled = img if s == 1.0 else F.interpolate(img[None], (round(height * s), round(width * s)),
                                                    mode="bilinear", align_corners=False)[0]
        msf.append(pair_of(scaled))
    label = torch.zeros(20)
    label[[2, 5]] = 1
    args = argparse.Namespace(adv_iter=12, AD_coeff=7.0, AD_stepsize=0.08, score_th=0.5)
    got = image_advcam(model64, msf, (height, width), label, args)
    assert got["keys"].tolist() == [2, 5] and got["keys"].dtype == np.int64
    assert got["cam"].shape == (2, 13, 15) and got["high_res"].shape == (2, height, width)
    cam, high_res = literal_image_advcam(model64, msf, (height, width), [2, 5], 12, 7.0, 0.08, 0.5)
    np.testing.assert_allclose(got["cam"], cam.numpy().astype(np.float32), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["high_res"], high_res.numpy().astype(np.float32), rtol=1e-6, atol=1e-7)
    assert got["high_res"].max() > 0.99  # normalised per class, non-trivial


def test_image_without_labels(model64):
    args = argparse.Namespace(adv_iter=3, AD_coeff=7.0, AD_stepsize=0.08, score_th=0.5)
    got = image_advcam(model64, [pair_of(torch.zeros(3, 20, 24, dtype=torch.float64))], (20, 24), torch.zeros(20),
                       args)
    assert got["keys"].shape == (0,) and got["cam"].shape == (0, 5, 6) and got["high_res"].shape == (0, 20, 24)


@pytest.fixture
def advcam_args(fake_voc, tmp_path):
    torch.manual_seed(0)
    net = Net(width=8)
    save_torch(str(tmp_path / "wood.pth"), net.state_dict())
    return argparse.Namespace(
        voc12_root=fake_voc["root"], infer_list="train", device="cpu", num_workers=0, backbone_width=8,
        make_advcam_from="wood", wood_weights_name=str(tmp_path / "wood.pth"),
        cam_weights_name=str(tmp_path / "missing_cam.pth"), cam_scales=[1.0, 0.5], adv_iter=3, AD_coeff=7.0,
        AD_stepsize=0.08, score_th=0.5, advcam_out_dir=str(tmp_path / "advcam"))


def test_run_writes_make_cam_format_resumes_and_pool_equals_single(advcam_args, fake_voc, tmp_path):
    args = advcam_args
    make_advcam.run(args)
    model = make_advcam.load_attacked_model(args, args.wood_weights_name, "")
    dataset = VOC12ClassificationDatasetMSF(fake_voc["train"], fake_voc["root"], scales=args.cam_scales)
    for i, img_id in enumerate(fake_voc["train"]):
        saved = load_npz(os.path.join(args.advcam_out_dir, img_id + ".npz"))
        assert sorted(saved) == ["cam", "high_res", "keys"]
        assert saved["keys"].tolist() == np.nonzero(fake_voc["labels"][img_id])[0].tolist()
        assert saved["cam"].dtype == np.float32 and saved["high_res"].shape[1:] == (64, 64)
        pack = dataset[i]
        expected = image_advcam(model, pack["img"], pack["size"], pack["label"], args)
        for key in saved:
            np.testing.assert_array_equal(saved[key], expected[key])
    # resume: existing outputs are skipped
    first = os.path.join(args.advcam_out_dir, fake_voc["train"][0] + ".npz")
    stamp = os.stat(first).st_mtime_ns
    make_advcam.run(args)
    assert os.stat(first).st_mtime_ns == stamp
    # two CPU worker processes give the same files
    pooled = argparse.Namespace(**{**vars(args), "num_workers": 2, "advcam_out_dir": str(tmp_path / "pooled")})
    make_advcam.run(pooled)
    for img_id in fake_voc["train"]:
        a = load_npz(os.path.join(args.advcam_out_dir, img_id + ".npz"))
        b = load_npz(os.path.join(pooled.advcam_out_dir, img_id + ".npz"))
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-7)


def test_run_missing_weights(advcam_args):
    advcam_args.make_advcam_from = "id"
    with pytest.raises(InputError, match="missing_cam.pth.*train_cam"):
        make_advcam.run(advcam_args)


def test_out_of_memory_splits_the_classes(model64, monkeypatch):
    g = torch.Generator().manual_seed(3)
    pair = pair_of(torch.randn(3, 48, 48, generator=g, dtype=torch.float64))
    classes = torch.tensor([1, 4, 6])
    expected = advcam_regions(model64, pair, classes, 2, 7.0, 0.08, 0.5)
    calls = []

    def small_device(model, pair, classes, *rule):
        calls.append(len(classes))
        if len(classes) > 1:
            raise torch.OutOfMemoryError("fake")
        return advcam_regions(model, pair, classes, *rule)
    monkeypatch.setattr(make_advcam, "advcam_regions", small_device)
    got = make_advcam.advcam_regions_fitting_memory(model64, pair, classes, 2, 7.0, 0.08, 0.5)
    assert calls == [3, 1, 2, 1, 1]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
