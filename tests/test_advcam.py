"""misc/advcam.py: the batched AdvCAM equals the literal per-image, per-scale, per-class loop of docs/method.md
§4.6
(bench/advcam_speed.py's `literal_image_advcam`, the baseline of the speed bench)."""
import argparse
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import run_sample
from bench.advcam_speed import literal_class_run, literal_image_advcam
from fakevoc import advcam_rule, driver_args
from misc import advcam
from misc.advcam import accumulation_multiplier, adv_iterations, advcam_regions, image_advcam, scale_processing_order
from misc.batching import same_size_groups
from misc.utils import InputError, load_npz, save_torch
from net.resnet50_cam import Net
from step import make_advcam
from voc12.dataloader import VOC12ClassificationDatasetMSF

torch.set_num_threads(1)  # the test machine's 2 cores are shared: more threads only contend


def test_iteration_rules():
    assert [adv_iterations(27, False), adv_iterations(27, True)] == [27, 13]
    assert [adv_iterations(n, True) for n in (3, 5, 6, 8, 10, 11, 12)] == [3, 5, 5, 5, 5, 5, 6]
    assert scale_processing_order(4) == [1, 0, 2, 3] and scale_processing_order(1) == [0]
    assert scale_processing_order(2) == [1, 0]
    assert accumulation_multiplier(27) == 2.0 and accumulation_multiplier(10) == 1.0


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
        expected, init = literal_class_run(model64, pair, c, n_iter, 7.0, 0.08, 0.5)
        assert (expected > 0).any()
        assert not torch.allclose(expected, n_iter * init)  # the image moved: later regions differ
        torch.testing.assert_close(got[row], expected, rtol=1e-10, atol=1e-12)


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
    args = driver_args(adv_iter=12)
    got = image_advcam(model64, msf, (height, width), label, *advcam_rule(args), amp=args.amp,
                       channels_last=args.channels_last)
    assert got["keys"].tolist() == [2, 5] and got["keys"].dtype == np.int64
    assert got["cam"].shape == (2, 13, 15) and got["high_res"].shape == (2, height, width)
    cam, high_res = literal_image_advcam(model64, msf, (height, width), [2, 5], 12, 7.0, 0.08, 0.5)
    np.testing.assert_allclose(got["cam"], cam.numpy().astype(np.float32), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["high_res"], high_res.numpy().astype(np.float32), rtol=1e-6, atol=1e-7)
    assert got["high_res"].max() > 0.99  # normalised per class, non-trivial


def msf_of(img, scales):
    """MSF pairs of a (3, H, W) image (bilinear rescale: the test only needs some pyramid)."""
    height, width = img.shape[1:]
    return [pair_of(img if s == 1.0 else F.interpolate(img[None], (round(height * s), round(width * s)),
                                                       mode="bilinear", align_corners=False)[0])
            for s in scales]


def labels_of(*class_lists):
    out = []
    for classes in class_lists:
        label = torch.zeros(20)
        label[classes] = 1
        out.append(label)
    return out


def test_several_images_in_one_batch_equal_the_literal_loop(model64):
    """Three images of one size (one without labels) in one batch: each equals its literal loop."""
    g = torch.Generator().manual_seed(4)
    size = (40, 52)
    imgs = [torch.randn(3, *size, generator=g, dtype=torch.float64) for _ in range(3)]
    labels = labels_of([1, 9], [], [9])
    args = driver_args(adv_iter=7)
    got = advcam.group_advcam(model64, [(msf_of(img, (1.0, 0.5)), size, label)
                                             for img, label in zip(imgs, labels)], *advcam_rule(args),
                                   amp=args.amp, channels_last=args.channels_last)
    assert [r["keys"].tolist() for r in got] == [[1, 9], [], [9]]
    assert got[1]["cam"].shape == (0, 10, 13) and got[1]["high_res"].shape == (0, 40, 52)
    for img, label, result in zip(imgs, labels, got):
        keys = torch.nonzero(label)[:, 0]
        if len(keys) == 0:
            continue
        cam, high_res = literal_image_advcam(model64, msf_of(img, (1.0, 0.5)), size, keys, 7, 7.0, 0.08, 0.5)
        # float64 maths on both sides, saved as float32
        np.testing.assert_allclose(result["cam"], cam.numpy().astype(np.float32), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(result["high_res"], high_res.numpy().astype(np.float32), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="one size"):
        advcam.group_advcam(model64, [(msf_of(imgs[0], (1.0,)), size, labels[0]),
                                           (msf_of(imgs[0][:, :32], (1.0,)), (32, 52), labels[0])],
                            *advcam_rule(args), amp=args.amp, channels_last=args.channels_last)


@pytest.fixture(scope="module")
def model32():
    torch.manual_seed(0)
    model = Net(width=8, frozen_bn=True, detach_stage2=False).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


FP32_ATOL = 1e-5   # float32 batched vs literal, on maps normalised to [0, 1]
BF16_ATOL = 0.1    # --amp bf16 vs float32: largest difference of a normalised map (measured 0.04 here)
BF16_MEAN = 0.02   # ... and mean difference (measured 0.013 here)


def test_float32_batch_channels_last_and_bf16_against_the_literal_loop(model32):
    g = torch.Generator().manual_seed(5)
    size = (48, 64)
    imgs = [torch.randn(3, *size, generator=g) for _ in range(2)]
    labels = labels_of([3], [0, 11])
    images = [(msf_of(img, (1.0, 0.5)), size, label) for img, label in zip(imgs, labels)]
    literal = [literal_image_advcam(model32, msf, size, torch.nonzero(label)[:, 0], 5, 7.0, 0.08, 0.5)
               for msf, _, label in images]
    for amp, channels_last in [("none", False), ("none", True), ("bf16", False)]:
        args = driver_args(adv_iter=5, amp=amp, channels_last=channels_last)
        net = model32.to(memory_format=torch.channels_last) if channels_last else model32
        got = advcam.group_advcam(net, images, *advcam_rule(args), amp=args.amp, channels_last=args.channels_last)
        model32.to(memory_format=torch.contiguous_format)
        for result, (cam, high_res) in zip(got, literal):
            for name, expected in (("cam", cam), ("high_res", high_res)):
                diff = np.abs(result[name] - expected.numpy())
                if amp == "none":
                    assert diff.max() <= FP32_ATOL, (name, channels_last, diff.max())
                else:
                    assert diff.max() <= BF16_ATOL and diff.mean() <= BF16_MEAN, (name, diff.max(), diff.mean())
                    assert diff.max() > 0  # bf16 did run: it rounds


def test_same_size_groups():
    sizes = [(2, 3), (4, 5), (2, 3), (2, 3), (4, 5), (6, 7), (2, 3), (6, 7)]
    items = list(enumerate(sizes))
    groups = list(same_size_groups(items, lambda item: item[1], 2, max_waiting=3))
    assert sorted(i for grp in groups for i, _ in grp) == list(range(len(sizes)))  # each item once
    assert all(len({size for _, size in grp}) == 1 and len(grp) <= 2 for grp in groups)
    assert [[i for i, _ in grp] for grp in groups] == [[0, 2], [1, 4], [3, 6], [5, 7]]
    # bounded waiting: the fullest bucket leaves early
    assert [[i for i, _ in grp] for grp in same_size_groups(items[:3], lambda item: item[1], 5, max_waiting=2)] \
        == [[0, 2], [1]]  # max_waiting is raised to the group size (5): nothing leaves early here
    early = list(same_size_groups([(0, "a"), (1, "b"), (2, "a"), (3, "c")], lambda item: item[1], 3))
    assert [[i for i, _ in grp] for grp in early] == [[0, 2], [1], [3]]
    assert [len(grp) for grp in same_size_groups(range(5), lambda item: 0, 1)] == [1] * 5


def test_image_without_labels(model64):
    args = driver_args(adv_iter=3)
    got = image_advcam(model64, [pair_of(torch.zeros(3, 20, 24, dtype=torch.float64))], (20, 24), torch.zeros(20),
                       *advcam_rule(args), amp=args.amp, channels_last=args.channels_last)
    assert got["keys"].shape == (0,) and got["cam"].shape == (0, 5, 6) and got["high_res"].shape == (0, 20, 24)


@pytest.fixture
def advcam_args(fake_voc, tmp_path):
    torch.manual_seed(0)
    net = Net(width=8)
    save_torch(str(tmp_path / "wood.pth"), net.state_dict())
    return driver_args(
        tmp_path / "work", voc12_root=fake_voc["root"], infer_list="train", num_workers=0, backbone_width=8,
        make_advcam_from="wood", wood_weights_name=str(tmp_path / "wood.pth"),
        cam_weights_name=str(tmp_path / "missing_cam.pth"), cam_scales=[1.0, 0.5], adv_iter=3,
        advcam_out_dir=str(tmp_path / "advcam"))


def assert_same_files(dir_a, dir_b, ids, atol):
    for img_id in ids:
        a, b = (load_npz(os.path.join(d, img_id + ".npz")) for d in (dir_a, dir_b))
        assert a["keys"].tolist() == b["keys"].tolist()
        for key in ("cam", "high_res"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=atol)


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
        expected = image_advcam(model, pack["img"], pack["size"], pack["label"], *advcam_rule(args), amp=args.amp,
                                channels_last=args.channels_last)
        for key in saved:
            np.testing.assert_array_equal(saved[key], expected[key])
    # resume: existing outputs are skipped
    first = os.path.join(args.advcam_out_dir, fake_voc["train"][0] + ".npz")
    stamp = os.stat(first).st_mtime_ns
    make_advcam.run(args)
    assert os.stat(first).st_mtime_ns == stamp
    # several images of one size per batch (fake VOC's images are all 64 px) give the same files
    batched = argparse.Namespace(**{**vars(args), "advcam_batch": 3, "advcam_out_dir": str(tmp_path / "batched")})
    make_advcam.run(batched)
    assert_same_files(args.advcam_out_dir, batched.advcam_out_dir, fake_voc["train"], atol=FP32_ATOL)
    # two CPU worker processes give the same files
    pooled = argparse.Namespace(**{**vars(args), "num_workers": 2, "advcam_out_dir": str(tmp_path / "pooled")})
    make_advcam.run(pooled)
    assert_same_files(args.advcam_out_dir, pooled.advcam_out_dir, fake_voc["train"], atol=1e-7)


def test_the_driver_rejects_a_batch_below_one():
    with pytest.raises(InputError, match="--advcam_batch 0: must be an integer >= 1"):
        run_sample.parse_args(["--device", "cpu", "--advcam_batch", "0"])


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
    monkeypatch.setattr(advcam, "advcam_regions", small_device)
    got = advcam.advcam_regions_fitting_memory(model64, pair, classes, 2, 7.0, 0.08, 0.5)
    assert calls == [3, 1, 2, 1, 1]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
