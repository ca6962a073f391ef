"""The run report (misc/summary.py): summary.md beside the paper's numbers, and samples.png."""
import os

import numpy as np
from PIL import Image

from fakevoc import make_fake_voc
from misc import summary
from misc.report import add_to_summary, read_summary
from misc.utils import save_npz, save_png


def entry(name, step, miou, threshold, background_iou):
    classes = ["background"] + [f"c{i}" for i in range(20)]
    iou = {c: None for c in classes}
    iou["background"], iou["c0"] = background_iou, 2 * miou - background_iou
    return {"name": name, "step": step, "miou": miou, "iou": iou, "precision": dict(iou), "recall": dict(iou),
            "threshold": threshold}


def test_markdown_table_orders_entries_keeps_thresholds_and_cites_the_paper():
    entries = [entry("pseudo_mask", "eval_sem_seg", 30.0, None, 50.0),
               entry("baseline_cam", "eval_cam", 17.25, 0.15, 40.0),
               entry("extra", "eval_cam", 1.0, 0.05, 1.0)]
    text = summary.summary_markdown(entries)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "eval_" in line]
    assert [r.split(" | ")[0] for r in rows] == ["| baseline_cam", "| pseudo_mask", "| extra"]
    assert rows[0].split(" | ")[2:4] == ["0.15", "17.2"] and "48.3" in rows[0]
    assert rows[1].split(" | ")[2] == "-" and "about 72.0" in rows[1]
    assert "| background | 40.0 | 50.0 | 1.0 |" in text and "| c1 |" not in text
    seg = summary.summary_markdown([entry("deeplab_val_crf", "eval_seg", 40.0, None, 60.0)])
    assert "| deeplab_val_crf | eval_seg |" in seg and "69.8" in seg and "test 69.9" in seg


def test_report_writes_summary_md_and_a_samples_grid(tmp_path):
    voc = make_fake_voc(tmp_path / "VOC2012", n_train=3, n_val=1, size=48, seed=0)
    work = tmp_path / "work"
    for name, thr in (("baseline_cam", 0.3), ("wood_cam", 0.2)):
        for img_id in voc["train"]:
            keys = np.nonzero(voc["labels"][img_id])[0]
            save_npz(str(work / name / f"{img_id}.npz"), keys=keys.astype(np.int64),
                     cam=np.ones((len(keys), 12, 12), np.float32), high_res=np.ones((len(keys), 48, 48), np.float32))
        add_to_summary(str(work), entry(name, "eval_cam", 20.0, thr, 30.0))
    for img_id in voc["train"][:2]:
        save_png(str(work / "pseudo_mask" / f"{img_id}.png"), voc["gt"][img_id])
    save_png(str(work / summary.SEG_SAMPLES / f"{voc['train'][0]}.png"), voc["gt"][voc["train"][0]])
    text = summary.write_report(str(work), voc["root"], n_samples=8)
    assert (work / "summary.md").read_text() == text and "| wood_cam | eval_cam | 0.2 |" in text
    grid = np.asarray(Image.open(work / "samples.png"))
    assert grid.shape == (16 + 128 * 3, 128 * 7, 3)   # 3 train images, 7 columns
    # a CAM of 1 everywhere beats every threshold: the baseline column shows the class colour, no background
    tile = grid[16:16 + 48, 2 * 128:2 * 128 + 48]
    assert not (tile == 0).all(axis=-1).any()
    assert (grid[16 + 2 * 128:, 5 * 128:] == 255).all()   # the third image has no pseudo mask: blank
    assert os.path.isfile(work / "summary.json")
    # the segmentation network's column: the first image's prediction, blank for the others
    assert np.array_equal(grid[16:16 + 48, 6 * 128:6 * 128 + 48], summary._colour(voc["gt"][voc["train"][0]]))
    assert (grid[16 + 128:, 6 * 128:] == 255).all()


def test_instance_entries_get_their_own_table_and_samples_an_instance_column(tmp_path):
    voc = make_fake_voc(tmp_path / "VOC2012", n_train=2, n_val=1, size=48, seed=0)
    work = tmp_path / "work"
    ap = {c: None for c in [f"c{i}" for i in range(20)]}
    ap["c0"], ap["c2"] = 30.0, 20.0
    add_to_summary(str(work), entry("pseudo_mask", "eval_sem_seg", 30.0, None, 50.0))
    add_to_summary(str(work), {"name": "ins_seg", "step": "eval_ins_seg", "map": 25.0, "ap": ap, "coco_ap50": 22.5,
                               "iou_thresh": 0.5, "images": 2, "eval_set": "train"})
    text = summary.summary_markdown(read_summary(str(work)))
    assert "| ins_seg | eval_ins_seg | 2 | 25.0 | 22.5 | 46.7 (IRN's instance masks, train, ResNet-50) |" in text
    assert "| c0 | 30.0 |" in text and "| c1 |" not in text and "| pseudo_mask | eval_sem_seg |" in text
    assert text.index("| pseudo_mask |") < text.index("| ins_seg |")
    # two detections of the first image: the higher score drawn on top in palette colour 1, the other colour 2;
    # a score below 1e-5 is not drawn
    masks = np.zeros((3, 48, 48), bool)
    masks[0, 0:10, 0:10] = masks[1, 5:20, 5:20] = masks[2, 40:, 40:] = True
    save_npz(str(work / "ins_seg" / f"{voc['train'][0]}.npz"), score=np.array([0.4, 0.9, 0.0], np.float32),
             mask=masks, **{"class": np.array([0, 2, 2])})
    summary.write_report(str(work), voc["root"], n_samples=8)
    grid = np.asarray(Image.open(work / "samples.png"))
    assert grid.shape == (16 + 128 * 2, 128 * 8, 3)   # 8 columns: the instances last
    tile = grid[16:16 + 48, 7 * 128:7 * 128 + 48]
    palette = summary.palette_voc()
    assert (tile[10, 10] == palette[1]).all() and (tile[2, 2] == palette[2]).all() and (tile[45, 45] == 0).all()
    assert (grid[16 + 128:, 7 * 128:] == 255).all()   # no instance file for the second image: blank
