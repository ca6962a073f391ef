"""step/eval_sem_seg.py (docs/method.md §5.4): 255 predictions are background; summary.json entry; missing files."""
import argparse
import json
import os

import numpy as np
import pytest

from misc import metrics
from misc.utils import InputError, save_png
from step import eval_sem_seg


def _args(tmp_path, voc, **kw):
    args = dict(voc12_root=voc["root"], chainer_eval_set="train", sem_seg_out_dir=str(tmp_path / "pseudo_mask"),
                work_dir=str(tmp_path / "work"), eval_name=None)
    args.update(kw)
    return argparse.Namespace(**args)


def literal_miou(pairs, n_class=21):
    """chainercv's definition by loops: one confusion over all pixels (gt 255 skipped), IoU of the
    classes present in the ground truth or the prediction."""
    conf = np.zeros((n_class, n_class), np.int64)
    for pred, gt in pairs:
        for p, g in zip(pred.reshape(-1), gt.reshape(-1)):
            if g != 255:
                conf[g, p] += 1
    ious = [conf[c, c] / (conf[c].sum() + conf[:, c].sum() - conf[c, c]) for c in range(n_class)
            if conf[c].sum() + conf[:, c].sum() > 0]
    return float(np.mean(ious))


def test_255_counts_as_background_and_summary_entry(tmp_path):
    from fakevoc import make_fake_voc
    voc = make_fake_voc(tmp_path / "VOC2012", n_train=3, n_val=1, size=32, seed=0)
    args = _args(tmp_path, voc)
    rng = np.random.default_rng(0)
    pairs, raw_preds = [], []
    for img_id in voc["train"]:
        gt = voc["gt"][img_id]
        pred = np.where(gt == 255, 0, gt).astype(np.uint8)
        pred[rng.random(gt.shape) < 0.2] = 255            # unsure pixels: scored as background
        pred[rng.random(gt.shape) < 0.05] = 7             # a few wrong classes
        save_png(os.path.join(args.sem_seg_out_dir, img_id + ".png"), pred)
        pairs.append((np.where(pred == 255, 0, pred), gt))
        raw_preds.append(pred)
    eval_sem_seg.run(args)
    with open(os.path.join(args.work_dir, "summary.json")) as f:
        entries = json.load(f)
    assert [e["name"] for e in entries] == ["pseudo_mask"] and entries[0]["step"] == "eval_sem_seg"
    expected = literal_miou(pairs)
    assert 0 < expected < 1
    assert entries[0]["miou"] == round(expected * 100, 2)
    assert entries[0]["iou"]["background"] is not None

    result = metrics.score_label_folder(args.sem_seg_out_dir, voc["root"], voc["train"], unsure_as_background=True)
    assert abs(result["miou"] - expected) < 1e-12
    # counting 255 as an ignored label instead would change the number
    # ignoring the unsure pixels instead would score higher: they are really counted as background
    ignored = [(p, np.where(raw == 255, 255, g)) for (p, g), raw in zip(pairs, raw_preds)]
    assert literal_miou(ignored) > expected + 1e-3
    assert metrics.prediction_as_label(np.array([[255, 3], [0, 255]])).tolist() == [[0, 3], [0, 0]]

    eval_sem_seg.run(_args(tmp_path, voc, eval_name="irn_masks"))
    with open(os.path.join(args.work_dir, "summary.json")) as f:
        assert [e["name"] for e in json.load(f)] == ["pseudo_mask", "irn_masks"]


def test_missing_predictions_are_named(tmp_path):
    from fakevoc import make_fake_voc
    voc = make_fake_voc(tmp_path / "VOC2012", n_train=3, n_val=1, size=32, seed=1)
    args = _args(tmp_path, voc)
    with pytest.raises(InputError, match=f"missing folder {args.sem_seg_out_dir}"):
        eval_sem_seg.run(args)
    first = voc["train"][0]
    save_png(os.path.join(args.sem_seg_out_dir, first + ".png"), voc["gt"][first])
    with pytest.raises(InputError, match=f"2 of the 3 pseudo masks .* missing from {args.sem_seg_out_dir} "
                                         rf"\({voc['train'][1]}.png, {voc['train'][2]}.png\)"):
        eval_sem_seg.run(args)
    for img_id in voc["train"][1:]:
        save_png(os.path.join(args.sem_seg_out_dir, img_id + ".png"), np.zeros((5, 5), np.uint8))
    with pytest.raises(InputError, match=f"{voc['train'][1]}.png against its ground truth"):
        eval_sem_seg.run(args)
    assert not os.path.exists(os.path.join(args.work_dir, "summary.json"))
