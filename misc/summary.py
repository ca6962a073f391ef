"""The run's report: <work_dir>/summary.md (table beside the paper's VOC numbers) and samples.png.

    python -m misc.summary --work_dir result/toy --voc12_root Data/ToyVOC

Reads <work_dir>/summary.json (written by the eval steps) and the output folders of the run.
"""
import argparse
import os

import numpy as np
from PIL import Image, ImageDraw

from misc.coco import kept_score
from misc.metrics import cam_to_label
from misc.report import read_summary
from misc.utils import atomic_path, load_npz, palette_voc

# docs/method.md §7: the paper's VOC 2012 `train` numbers (mIoU %) for the entries this pipeline produces.
PAPER_VOC = {
    "baseline_cam": ("CAM seed of the ID classifier (IRN)", 48.3),
    "wood_cam": ("W-OoD CAM seed", 53.3),
    "wood_advcam": ("AdvCAM seed from the W-OoD classifier", 59.0),
    "pseudo_mask": ("pseudo mask after IRN (W-OoD)", 72.0),
    # docs/method.md §7, 8: DeepLab-v2 on the pseudo masks, VOC val (test 69.9; AdvCAM's pipeline 68.1 / 68.0)
    "deeplab_val": ("DeepLab-v2 on the pseudo masks, val; test 69.9", 69.8),
    "deeplab_val_crf": ("DeepLab-v2 on the pseudo masks, val, CRF; test 69.9", 69.8),
}
ORDER = ["baseline_cam", "wood_cam", "wood_advcam", "pseudo_mask", "deeplab_val", "deeplab_val_crf"]
N_SAMPLES = 8  # rows of samples.png: the first images of the evaluated list
SEG_SAMPLES = "deeplab_samples"  # eval_seg's predictions for those rows
# docs/method.md §9: IRN's published instance AP50 (VOC 2012 train, from class labels, ResNet-50)
PAPER_INSTANCE = {"ins_seg": ("IRN's instance masks, train, ResNet-50", 46.7)}
INSTANCE_STEP = "eval_ins_seg"
INS_SEG = "ins_seg"  # make_ins_seg's folder: the instance column of samples.png


def _fmt(x):
    return "-" if x is None else f"{x:.1f}"


def _fmt_threshold(t):
    return "-" if t is None else format(t, "g")   # exactly as swept (0.15 stays 0.15)


def _mean_defined(values):
    vals = [v for k, v in values.items() if v is not None]
    return sum(vals) / len(vals) if vals else None


def summary_markdown(entries):
    """The report table as Markdown: one row per entry, paper numbers beside, per-class IoU below; instance
    entries (eval_ins_seg) in a table of their own after it."""
    instance_entries = [e for e in entries if e.get("step") == INSTANCE_STEP]
    entries = [e for e in entries if e.get("step") != INSTANCE_STEP]
    by_name = {e["name"]: e for e in entries}
    names = [n for n in ORDER if n in by_name] + [e["name"] for e in entries if e["name"] not in ORDER]
    lines = ["| result | step | threshold | mIoU | mean precision | mean recall | paper (VOC 2012) |",
             "|---|---|---|---|---|---|---|"]
    for n in names:
        e = by_name[n]
        paper = PAPER_VOC.get(n)
        paper_txt = f"{paper[1]:.1f} ({paper[0]})" if paper else ""
        if n in ("wood_advcam", "pseudo_mask") and paper:
            paper_txt = "about " + paper_txt
        lines.append(f"| {n} | {e['step']} | {_fmt_threshold(e.get('threshold'))} | {_fmt(e['miou'])} | "
                     f"{_fmt(_mean_defined(e['precision']))} | {_fmt(_mean_defined(e['recall']))} | "
                     f"{paper_txt} |")
    classes = [c for c in (entries[0]["iou"] if entries else {})
               if any(by_name[n]["iou"].get(c) is not None for n in names)]
    if classes:
        lines += ["", "Per-class IoU (%), classes present in the evaluated set:", "",
                  "| class | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for c in classes:
            lines.append(f"| {c} | " + " | ".join(_fmt(by_name[n]["iou"].get(c)) for n in names) + " |")
    return "\n".join(lines + instance_markdown(instance_entries)) + "\n"


def instance_markdown(entries):
    """Lines of the instance table (AP50 %, VOC's rule) with the COCO-style cross-check and IRN's number, and
    per-class AP50 below; none without instance entries."""
    if not entries:
        return []
    lines = ["", "Instance masks (docs/method.md §9): AP50 by VOC's rule (chainercv); COCO-style AP@0.5 from "
             "pycocotools is a cross-check, not the paper's metric.", "",
             "| result | step | images | AP50 (mAP) | COCO-style AP@0.5 (cross-check) | paper (VOC 2012) |",
             "|---|---|---|---|---|---|"]
    for e in entries:
        paper = PAPER_INSTANCE.get(e["name"])
        paper_txt = f"{paper[1]:.1f} ({paper[0]})" if paper else ""
        lines.append(f"| {e['name']} | {e['step']} | {e.get('images', '-')} | {_fmt(e['map'])} | "
                     f"{_fmt(e.get('coco_ap50'))} | {paper_txt} |")
    classes = [c for c in entries[0]["ap"] if any(e["ap"].get(c) is not None for e in entries)]
    if classes:
        lines += ["", "Per-class AP50 (%), classes with ground-truth instances:", "",
                  "| class | " + " | ".join(e["name"] for e in entries) + " |", "|---|" + "---|" * len(entries)]
        lines += [f"| {c} | " + " | ".join(_fmt(e["ap"].get(c)) for e in entries) + " |" for c in classes]
    return lines


def instance_colours(path, palette=None):
    """RGB (H, W, 3) of the detections of an instance file (misc/instance.py): each detection of score >= 1e-5
    in its own palette colour (the best-scoring one first), higher scores drawn over lower; black elsewhere."""
    palette = palette_voc() if palette is None else palette
    data = load_npz(path)
    order = [k for k in np.argsort(-data["score"], kind="stable") if kept_score(data["score"][k])]
    index = np.zeros(data["mask"].shape[1:], np.int64)
    for rank, k in reversed(list(enumerate(order))):  # the best last: on top
        index[data["mask"][k]] = min(rank + 1, 254)
    return palette[index]


def _colour(label):
    return palette_voc()[label]


def _cam_label(cam_dir, img_id, threshold):
    data = load_npz(os.path.join(cam_dir, img_id + ".npz"))
    return cam_to_label(data["high_res"], data["keys"], threshold)


def samples_picture(voc12_root, ids, columns, tile=128):
    """A grid: one row per image; columns = [(title, fn(img_id) -> RGB uint8 (H, W, 3) or None)]."""
    head = 16
    canvas = Image.new("RGB", (tile * len(columns), head + tile * len(ids)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, (title, _) in enumerate(columns):
        draw.text((c * tile + 3, 2), title, fill=(0, 0, 0))
    for r, img_id in enumerate(ids):
        for c, (_, fn) in enumerate(columns):
            rgb = fn(img_id)
            if rgb is None:
                continue
            im = Image.fromarray(rgb)
            im.thumbnail((tile, tile))
            canvas.paste(im, (c * tile, head + r * tile))
    return canvas


def write_report(work_dir, voc12_root, eval_list="train", n_samples=N_SAMPLES, dirs=None):
    """Write summary.md and samples.png into work_dir; return the Markdown text."""
    from misc.imutils import read_rgb
    from voc12.dataloader import load_gt, load_img_name_list
    entries = read_summary(work_dir)
    text = "# W-OoD run summary\n\n" + summary_markdown(entries)
    with atomic_path(os.path.join(work_dir, "summary.md")) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
    by_name = {e["name"]: e for e in entries}
    dirs = dirs or {n: os.path.join(work_dir, n) for n in ORDER + [SEG_SAMPLES, INS_SEG]}
    ids = load_img_name_list(voc12_root, eval_list)[:n_samples]

    def cam_column(name):
        def fn(img_id):
            path = os.path.join(dirs[name], img_id + ".npz")
            if name not in by_name or not os.path.isfile(path):
                return None
            return _colour(_cam_label(dirs[name], img_id, by_name[name]["threshold"]))
        return fn

    def png_column(name):
        def fn(img_id):
            path = os.path.join(dirs.get(name, ""), img_id + ".png")
            return _colour(np.asarray(Image.open(path))) if os.path.isfile(path) else None
        return fn

    columns = [("image", lambda i: read_rgb(os.path.join(voc12_root, "JPEGImages", i + ".jpg"))),
               ("ground truth", lambda i: _colour(load_gt(voc12_root, i))),
               ("baseline CAM", cam_column("baseline_cam")), ("W-OoD CAM", cam_column("wood_cam")),
               ("AdvCAM", cam_column("wood_advcam")), ("pseudo mask", png_column("pseudo_mask")),
               ("DeepLab-v2", png_column(SEG_SAMPLES))]
    if os.path.isdir(dirs.get(INS_SEG, "")):  # make_ins_seg ran: its instances, each in its own colour
        instance_file = lambda i: os.path.join(dirs[INS_SEG], i + ".npz")
        columns.append(("instances", lambda i: instance_colours(instance_file(i))
                        if os.path.isfile(instance_file(i)) else None))
    picture = samples_picture(voc12_root, ids, columns)
    with atomic_path(os.path.join(work_dir, "samples.png")) as tmp:
        picture.save(tmp, format="PNG")
    return text


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", required=True)
    p.add_argument("--voc12_root", required=True)
    p.add_argument("--eval_list", default="train")
    a = p.parse_args()
    print(write_report(a.work_dir, a.voc12_root, a.eval_list))
    print(f"report: {os.path.join(a.work_dir, 'summary.md')}, {os.path.join(a.work_dir, 'samples.png')}")


if __name__ == "__main__":
    main()
