import argparse
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fakevoc import driver_args, make_fake_voc, random_bn_statistics
from misc import cam as cam_maths
from misc import imutils, metrics
from misc.metrics import cam_to_label, confusion_matrix, scores
from misc.torchutils import frozen_cpu_graph
from misc.utils import InputError, load_npz, save_npz, save_torch
from net.resnet50_cam import CAM
from step import eval_cam, make_cam

WIDTH = 8
SCALES = [1.0, 0.5, 1.5, 2.0]
# non-square sizes, not multiples of 4 or 16
SIZES = [(64, 48), (50, 64), (37, 61)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("makecam")
    info = make_fake_voc(root / "VOC2012", n_train=3, n_val=1, n_aug_only=0, sizes=SIZES, seed=3)
    torch.manual_seed(0)
    model = random_bn_statistics(CAM(width=WIDTH))
    weights = str(root / "cam.pth")
    save_torch(weights, model.state_dict())
    args = driver_args(
        root / "work", voc12_root=info["root"], infer_list="train", chainer_eval_set="train", cam_scales=SCALES,
        make_cam_from="id", cam_weights_name=weights, wood_weights_name=str(root / "missing_wood.pth"),
        cam_out_dir=str(root / "cams"), eval_cam_dir=str(root / "cams"), advcam_out_dir=str(root / "advcam"),
        backbone_width=WIDTH, num_workers=0, cpu_jit=False, cam_eval_thres=[0.05, 0.1, 0.2, 0.3, 0.5])
    make_cam.run(args)
    return info, model.eval(), args


def literal_cam(model, voc12_root, img_id, label, scales):
    """docs/method.md §4.4 followed literally: one image, one scale at a time, the CAM formula of §2.2."""
    img = imutils.read_rgb(os.path.join(voc12_root, "JPEGImages", img_id + ".jpg"))
    H, W = img.shape[:2]
    strided_size = ((H - 1) // 4 + 1, (W - 1) // 4 + 1)
    up_size = (((H - 1) // 16 + 1) * 16, ((W - 1) // 16 + 1) * 16)
    cam, high_res = 0, 0
    for s in scales:
        s_img = img if s == 1 else imutils.rescale(img, s, 3)
        x = torch.from_numpy(imutils.hwc_to_chw(imutils.normalize(s_img)))
        pair = torch.stack([x, torch.flip(x, [2])])
        with torch.no_grad():
            feats = model.stage4(model.stage3(model.stage2(model.stage1(pair))))
            a = F.relu(F.conv2d(feats, model.classifier.weight))
            a = a[0] + torch.flip(a[1], [2])
        cam = cam + F.interpolate(a[None], strided_size, mode="bilinear", align_corners=False)[0]
        high_res = high_res + F.interpolate(a[None], up_size, mode="bilinear", align_corners=False)[0][:, :H, :W]
    keys = np.nonzero(label)[0]
    cam, high_res = cam[keys].numpy(), high_res[keys].numpy()
    for k in range(len(keys)):
        cam[k] /= cam[k].max() + 1e-5
        high_res[k] /= high_res[k].max() + 1e-5
    return keys, cam, high_res


def test_batched_equals_literal_loop(setup):
    info, model, args = setup
    for img_id in info["train"]:
        saved = load_npz(os.path.join(args.cam_out_dir, img_id + ".npz"))
        assert set(saved) == {"keys", "cam", "high_res"}
        keys, cam, high_res = literal_cam(model, info["root"], img_id, info["labels"][img_id], SCALES)
        H, W = info["gt"][img_id].shape
        assert saved["keys"].dtype == np.int64 and saved["keys"].tolist() == keys.tolist()
        assert saved["cam"].dtype == np.float32 and saved["high_res"].dtype == np.float32
        assert saved["cam"].shape == (len(keys), (H - 1) // 4 + 1, (W - 1) // 4 + 1)
        assert saved["high_res"].shape == (len(keys), H, W)
        np.testing.assert_allclose(saved["cam"], cam, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(saved["high_res"], high_res, rtol=1e-5, atol=1e-6)
        # normalised maps that are not trivial: each class peaks just below 1
        assert np.all(saved["high_res"].max(axis=(1, 2)) > 0.99)
        assert np.all(saved["high_res"].max(axis=(1, 2)) <= 1.0)


def test_pure_functions():
    maps = [torch.rand(2, 3, 4), torch.rand(2, 6, 8)]
    strided, high_res = cam_maths.accumulate_scale_maps(maps, (45, 50))
    assert strided.shape == (2, 12, 13) and high_res.shape == (2, 45, 50)
    up = F.interpolate(maps[1][None], (48, 64), mode="bilinear", align_corners=False)[0]
    up0 = F.interpolate(maps[0][None], (48, 64), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(high_res, (up0 + up)[:, :45, :50])
    label = np.zeros(20, np.float32)
    label[[4, 1]] = 1
    full = torch.rand(20, 12, 13), torch.rand(20, 45, 50)
    keys, cam, hr = cam_maths.keep_label_classes(*full, label)
    assert keys.tolist() == [1, 4]
    assert torch.allclose(cam[1], full[0][4] / (full[0][4].max() + 1e-5))
    cam2, hr2 = cam_maths.scale_maps_to_cam(maps, (45, 50))
    assert torch.allclose(hr2, cam_maths.normalise_per_class(high_res))
    assert cam_maths.strided_up_size((45, 50)) == (48, 64) and cam_maths.strided_size((45, 50)) == (12, 13)


def test_resume_skips_existing(setup):
    info, model, args = setup
    first, second = [os.path.join(args.cam_out_dir, i + ".npz") for i in info["train"][:2]]
    save_npz(first, keys=np.array([7]), cam=np.zeros((1, 1, 1), np.float32),
             high_res=np.zeros((1, 1, 1), np.float32))   # a stand-in that a re-run must keep
    expected_second = load_npz(second)
    os.remove(second)
    make_cam.run(args)
    assert load_npz(first)["keys"].tolist() == [7]
    again = load_npz(second)
    np.testing.assert_array_equal(again["high_res"], expected_second["high_res"])
    os.remove(first)
    make_cam.run(args)  # restore for the other tests


def test_cpu_process_pool_gives_the_same_files(setup, tmp_path):
    info, model, args = setup
    pool_args = argparse.Namespace(**{**vars(args), "cam_out_dir": str(tmp_path / "pool"), "num_workers": 2})
    make_cam.run(pool_args)
    for img_id in info["train"]:
        a = load_npz(os.path.join(args.cam_out_dir, img_id + ".npz"))
        b = load_npz(os.path.join(pool_args.cam_out_dir, img_id + ".npz"))
        assert a["keys"].tolist() == b["keys"].tolist()
        np.testing.assert_allclose(a["high_res"], b["high_res"], rtol=1e-5, atol=1e-6)


def test_frozen_graph_run_gives_the_same_files_up_to_rounding(setup, tmp_path):
    info, model, args = setup
    jit_args = argparse.Namespace(**{**vars(args), "cam_out_dir": str(tmp_path / "jit"), "cpu_jit": True})
    make_cam.run(jit_args)
    for img_id in info["train"]:
        a = load_npz(os.path.join(args.cam_out_dir, img_id + ".npz"))
        b = load_npz(os.path.join(jit_args.cam_out_dir, img_id + ".npz"))
        assert a["keys"].tolist() == b["keys"].tolist()
        for name in ("cam", "high_res"):
            # folded BatchNorm rounds differently: maps in [0, 1] agree to a few 1e-6
            np.testing.assert_allclose(a[name], b[name], rtol=0, atol=2e-5)
            assert not np.array_equal(a[name], np.zeros_like(a[name]))


def test_frozen_graph_equals_the_eager_net_at_every_size(setup):
    info, model, args = setup
    graph = frozen_cpu_graph(model, torch.zeros(2, 3, 64, 64))
    assert graph is not None and not list(graph.parameters())  # weights are constants of the graph
    with torch.inference_mode():
        for height, width in [(64, 64), (37, 61), (100, 29)]:  # sizes the trace never saw
            x = torch.randn(2, 3, height, width)
            expected = model(x)
            got = graph(x)
            assert got.shape == expected.shape == (20, (height + 15) // 16, (width + 15) // 16)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_an_untraceable_model_runs_eagerly(capsys):
    class CountsPixels(nn.Module):
        def forward(self, x):
            return int(x.numel())  # not a tensor: tracing fails

    assert frozen_cpu_graph(CountsPixels(), torch.zeros(1, 3, 4, 4)) is None
    assert "running it eagerly" in capsys.readouterr().out


def test_missing_weights_are_a_clear_error(setup, tmp_path):
    info, model, args = setup
    wood_args = argparse.Namespace(**{**vars(args), "make_cam_from": "wood", "cam_out_dir": str(tmp_path / "w")})
    with pytest.raises(InputError, match="missing_wood.pth.*train_wood"):
        make_cam.run(wood_args)


# --------------------------------------------------------------------------------------------- eval_cam

def test_labels_for_thresholds_equal_cam_to_label_with_ties():
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        high_res = (rng.integers(0, 5, size=(3, 9, 11)) / 4).astype(dtype)  # many exact ties
        keys = np.array([2, 5, 19])
        thresholds = [0.0, 0.25, 0.5, 0.1, 1.0]
        for t, pred in zip(thresholds, metrics.labels_for_thresholds(high_res, keys, thresholds)):
            np.testing.assert_array_equal(pred, cam_to_label(high_res, keys, t))
    empty = metrics.labels_for_thresholds(np.zeros((0, 4, 5), np.float32), np.zeros(0, np.int64), [0.1])
    np.testing.assert_array_equal(empty[0], cam_to_label(np.zeros((0, 4, 5), np.float32), [], 0.1))


def test_sweep_equals_direct_metric(setup):
    info, model, args = setup
    items = []
    for img_id in info["train"]:
        cam = load_npz(os.path.join(args.cam_out_dir, img_id + ".npz"))
        items.append((cam["high_res"], cam["keys"], info["gt"][img_id]))
    thresholds = args.cam_eval_thres
    sweep = metrics.sweep_thresholds(iter(items), thresholds)
    assert list(sweep) == thresholds
    mious = []
    for t in thresholds:
        preds = [cam_to_label(h, k, t) for h, k, _ in items]
        direct = scores(confusion_matrix(preds, [g for _, _, g in items], 21))
        assert sweep[t]["miou"] == pytest.approx(direct["miou"], abs=1e-12)
        np.testing.assert_allclose(sweep[t]["iou"], direct["iou"], equal_nan=True)
        mious.append(direct["miou"])
    assert len(set(np.round(mious, 9))) > 1  # the thresholds do change the result


def test_accumulated_sweep_is_the_released_selection_rule():
    """The released eval_cam_sub: preds / labels created once before the threshold loop (docs/method.md §4.3 (a))."""
    yy, xx = np.mgrid[:24, :24]
    items = []
    for cy, cx, cls in ((12, 12, 2), (8, 14, 6), (15, 9, 2)):
        gt = np.zeros((24, 24), np.uint8)
        gt[cy - 4:cy + 4, cx - 4:cx + 4] = cls + 1
        gt[0, :3] = 255
        dist = np.hypot(yy - cy, xx - cx)
        cam = (1 - dist / dist.max()) ** 6   # diffuse: a higher threshold is tighter, hence better
        items.append((cam[None].astype(np.float32), np.array([cls]), gt))
    thresholds = [0.06, 0.08, 0.10, 0.12]
    preds, labels, released = [], [], []
    for t in thresholds:
        for high_res, keys, gt in items:
            preds.append(cam_to_label(high_res, keys, t))
            labels.append(gt)
        released.append(scores(confusion_matrix(preds, labels, 21))["miou"])
    independent = [s["miou"] for s in metrics.sweep_thresholds(iter(items), thresholds).values()]
    assert independent == sorted(independent) and independent[0] < independent[-1]  # rises with t
    accumulated = metrics.accumulated_sweep(iter(items), thresholds)
    assert [s["miou"] for s in accumulated.values()] == pytest.approx(released, abs=1e-12)
    best_t, best = metrics.best_threshold(accumulated)
    assert best["miou"] == pytest.approx(max(released), abs=1e-12) and best_t == thresholds[int(np.argmax(released))]
    assert best["miou"] < max(independent) - 0.01  # the two rules do differ here


def test_eval_cam_run_writes_summary_and_reports_best(setup, capsys):
    info, model, args = setup
    sweep = eval_cam.run(args)
    best_t = max(args.cam_eval_thres, key=lambda t: sweep[t]["miou"])
    with open(os.path.join(args.work_dir, "summary.json")) as f:
        entries = json.load(f)
    (entry,) = [e for e in entries if e["name"] == "cams"]
    assert entry["step"] == "eval_cam" and entry["threshold"] == best_t
    assert entry["miou"] == round(sweep[best_t]["miou"] * 100, 2)
    out = capsys.readouterr().out
    assert f"best mIoU {100 * sweep[best_t]['miou']:5.1f} at threshold {best_t}" in out


def test_eval_cam_missing_cams_error(setup, tmp_path):
    info, model, args = setup
    partial = tmp_path / "partial"
    partial.mkdir()
    first = info["train"][0]
    os.link(os.path.join(args.cam_out_dir, first + ".npz"), partial / (first + ".npz"))
    bad = argparse.Namespace(**{**vars(args), "eval_cam_dir": str(partial)})
    with pytest.raises(InputError) as err:
        eval_cam.run(bad)
    msg = str(err.value)
    assert str(partial) in msg and info["train"][1] in msg and "make_cam" in msg and first not in msg
    with pytest.raises(InputError, match="make_advcam"):
        eval_cam.run(argparse.Namespace(**{**vars(args), "eval_cam_dir": args.advcam_out_dir}))


# ------------------------------------------------------------------------------- batching and --amp

CAM_BF16_ATOL = 0.02   # --amp bf16 vs float32, largest difference of a normalised map (measured 0.007 below)


def test_batched_images_channels_last_and_bf16_equal_the_literal_loop(setup, tmp_path):
    """--make_cam_batch 3 on two 48x64 images and one 37x61 (bucketed by size), also NHWC, equal the literal
    loop; --amp bf16 within CAM_BF16_ATOL of it."""
    _, model, args = setup
    info = make_fake_voc(tmp_path / "VOC2012", n_train=3, n_val=1, n_aug_only=0, sizes=[(48, 64), (48, 64), (37, 61)],
                         seed=5)
    literal = {i: literal_cam(model, info["root"], i, info["labels"][i], SCALES) for i in info["train"]}
    for name, amp, channels_last in [("batched", "none", False), ("nhwc", "none", True), ("bf16", "bf16", False)]:
        run_args = argparse.Namespace(**{**vars(args), "voc12_root": info["root"], "make_cam_batch": 3, "amp": amp,
                                         "channels_last": channels_last, "cam_out_dir": str(tmp_path / name)})
        make_cam.run(run_args)
        worst = 0.0
        for img_id in info["train"]:
            saved = load_npz(os.path.join(run_args.cam_out_dir, img_id + ".npz"))
            keys, cam, high_res = literal[img_id]
            assert saved["keys"].tolist() == keys.tolist()
            for got, expected in ((saved["cam"], cam), (saved["high_res"], high_res)):
                assert got.shape == expected.shape and got.dtype == np.float32
                worst = max(worst, float(np.abs(got - expected).max()))
        if amp == "none":
            assert worst <= 1e-5, (name, worst)
        else:
            assert 0 < worst <= CAM_BF16_ATOL, worst


def test_group_cam_needs_one_size(setup):
    _, model, _ = setup
    label = np.eye(20, dtype=np.float32)[3]
    with pytest.raises(ValueError, match="one size"):
        cam_maths.group_cam(model, [([np.zeros((2, 3, 32, 32), np.float32)], (32, 32), label),
                                   ([np.zeros((2, 3, 16, 32), np.float32)], (16, 32), label)], torch.device("cpu"))
