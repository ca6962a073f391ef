"""eval_seg (docs/method.md §8): the CRF image quirk, the CRF toward edges, predictions, summary entries, server
layout, the CRF's process pool."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import run_sample
from fakevoc import make_fake_voc
from misc.parallel import helper_pool, imap_in_pool
from misc.report import read_summary
from misc.utils import InputError, error_line
from net.deeplab_v2 import deeplab_v2
from step import eval_seg
from step.eval_seg import SERVER_SUBDIR, dense_crf, quirk_crf_image


def test_quirk_image_wraps_like_numpy_astype_uint8():
    x = np.array([[[-3.7, -120.2, 0.0], [5.9, 130.4, -0.5]]], np.float32)
    assert quirk_crf_image(x).tolist() == [[[253, 136, 0], [5, 130, 0]]]


def test_crf_moves_a_noisy_prediction_toward_the_image_edge():
    rng = np.random.default_rng(0)
    h, w, edge = 40, 40, 20
    image = np.zeros((h, w, 3), np.uint8)
    image[:, edge:] = 200
    truth = (np.arange(w)[None, :] >= edge).repeat(h, 0)
    # the network's boundary sits 4 pixels left of the edge, with noise on top
    p1 = np.where(np.arange(w)[None, :] >= edge - 4, 0.7, 0.3).repeat(h, 0) + rng.normal(0, 0.15, (h, w))
    p1 = np.clip(p1, 0.05, 0.95).astype(np.float32)
    prob = np.stack([1 - p1, p1])
    before = (np.argmax(prob, 0) == truth).mean()
    after = (np.argmax(dense_crf(image, prob), 0) == truth).mean()
    assert before < 0.93 and after > before + 0.05, (before, after)


def _setup(tmp_path, with_test, n_val=2):
    info = make_fake_voc(tmp_path / "VOC2012", n_train=2, n_val=n_val, size=40, seed=3, n_aug_only=2)
    torch.manual_seed(0)
    model = deeplab_v2(21, None, width=4, n_blocks=(1, 1, 1, 1))
    torch.save(model.state_dict(), tmp_path / "seg.pth")
    if with_test:  # pretend the aug-only ids are VOC's test split
        with open(tmp_path / "VOC2012" / "ImageSets" / "Segmentation" / "test.txt", "w") as f:
            f.write("\n".join(info["aug_only"]) + "\n")
    args = run_sample.parse_args(["--preset", "toy", "--voc12_root", info["root"], "--work_dir", str(tmp_path / "w"),
                                  "--seg_weights_name", str(tmp_path / "seg.pth"), "--seg_width", "4",
                                  "--device", "cpu"])
    return info, model.eval(), args


def test_eval_writes_predictions_scores_and_the_server_layout(tmp_path):
    info, model, args = _setup(tmp_path, with_test=True)
    eval_seg.run(args)
    work = tmp_path / "w"
    for img_id in info["val"]:
        image = eval_seg.read_bgr(info["root"], img_id) - np.asarray(eval_seg.MEAN_BGR, np.float32)
        prob = eval_seg.predict_prob(model, image, torch.device("cpu"))
        plain = np.asarray(Image.open(work / "deeplab_val" / f"{img_id}.png"))
        assert np.array_equal(plain, np.argmax(prob, 0))
        crf = np.asarray(Image.open(work / "deeplab_val_crf" / f"{img_id}.png"))
        assert np.array_equal(crf, np.argmax(dense_crf(quirk_crf_image(image), prob), 0))
    names = {e["name"]: e for e in read_summary(str(work))}
    assert set(names) == {"deeplab_val", "deeplab_val_crf"}
    assert names["deeplab_val"]["step"] == "eval_seg" and names["deeplab_val"]["miou"] is not None
    for img_id in info["aug_only"]:
        served = Image.open(work / "deeplab_test" / SERVER_SUBDIR / f"{img_id}.png")
        assert served.mode == "P" and served.size == (40, 40)
        assert np.array_equal(np.asarray(served), np.asarray(Image.open(work / "deeplab_test_crf" / f"{img_id}.png")))
    assert os.path.normpath(SERVER_SUBDIR).split(os.sep) == ["results", "VOC2012", "Segmentation", "comp6_test_cls"]


def test_no_test_split_means_no_server_folder(tmp_path, capsys):
    _, _, args = _setup(tmp_path, with_test=False)
    args.seg_crf = False
    eval_seg.run(args)
    assert not (tmp_path / "w" / "deeplab_test").exists()
    assert {e["name"] for e in read_summary(str(tmp_path / "w"))} == {"deeplab_val"}
    assert "no server predictions" in capsys.readouterr().out


def test_predictions_of_another_network_are_never_reused(tmp_path):
    info, model, args = _setup(tmp_path, with_test=False)
    args.seg_crf = False
    eval_seg.run(args)
    plain = tmp_path / "w" / "deeplab_val" / f"{info['val'][0]}.png"
    before = plain.stat().st_mtime_ns
    eval_seg.run(args)  # the same network: the predictions are kept
    assert plain.stat().st_mtime_ns == before
    torch.manual_seed(1)  # retrained: other weights in the same file
    torch.save(deeplab_v2(21, None, width=4, n_blocks=(1, 1, 1, 1)).state_dict(), tmp_path / "seg.pth")
    with pytest.raises(InputError, match="deeplab_val holds 2 eval_seg output"):
        eval_seg.run(args)
    args.overwrite = True
    eval_seg.run(args)
    assert plain.stat().st_mtime_ns != before


def _png_bytes(work):
    """{relative path: bytes} of every PNG under `work` (all prediction folders, the server layout included)."""
    return {str(p.relative_to(work)): p.read_bytes() for p in sorted(work.rglob("*.png"))}


def test_the_crf_pool_writes_what_one_process_writes_and_resumes(tmp_path):
    info, _, args = _setup(tmp_path, with_test=True, n_val=6)  # 6 images: more than the pool's window of 4
    args.num_workers = 0
    eval_seg.run(args)
    serial = _png_bytes(tmp_path / "w")
    args.work_dir, args.num_workers = str(tmp_path / "pool"), 2
    eval_seg.run(args)
    pool = tmp_path / "pool"
    assert _png_bytes(pool) == serial
    expected = {os.path.join(folder, f"{i}.png") for i in info["val"] for folder in ("deeplab_val", "deeplab_val_crf")}
    expected |= {os.path.join("deeplab_test", SERVER_SUBDIR, f"{i}.png") for i in info["aug_only"]}
    assert expected <= set(serial)
    assert read_summary(str(pool)) == read_summary(str(tmp_path / "w"))

    gone = pool / "deeplab_val_crf" / f"{info['val'][3]}.png"
    gone.unlink()
    stamps = {p: p.stat().st_mtime_ns for p in pool.rglob("*.png")}
    eval_seg.run(args)  # resumes: that image alone is predicted again (its plain PNGs too: it was not done)
    changed = {p.name for p, t in stamps.items() if p.stat().st_mtime_ns != t}
    assert gone.is_file() and changed == {gone.name}
    assert _png_bytes(pool) == serial


def _fail_on(value):
    if value == 3:
        raise InputError(f"item {value} is bad")
    return value * 10


def test_an_error_in_a_pool_process_reaches_the_caller_as_one_line():
    taken = []

    def jobs():
        for value in range(8):
            taken.append(value)
            yield (value,)

    with helper_pool(2) as pool:
        assert list(imap_in_pool(pool, _fail_on, [(0,), (1,), (2,)], 4)) == [0, 10, 20]
        with pytest.raises(InputError) as caught:
            for n_yielded, _ in enumerate(imap_in_pool(pool, _fail_on, jobs(), 2), 1):
                assert len(taken) <= n_yielded + 2  # the window (2) and the one yielded
    assert error_line(caught.value) == "item 3 is bad"


def test_a_failing_crf_write_stops_eval_seg(tmp_path):
    info, _, args = _setup(tmp_path, with_test=False, n_val=4)
    args.num_workers = 2
    (tmp_path / "w" / "deeplab_val_crf_color" / f"{info['val'][1]}.png").mkdir(parents=True)  # no file goes there
    with pytest.raises(OSError):
        eval_seg.run(args)
