"""The run's report: <work_dir>/summary.md (table beside the paper's VOC numbers) and samples.png.

    python -m misc.summary --work_dir result/toy --voc12_root Data/ToyVOC

Reads <work_dir>/summary.json (written by the eval steps) and the output folders of the run.
"""
import argparse
import os

import numpy as np
from PIL import Image, ImageDraw

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


def _fmt(x):
    return "-" if x is None else f"{x:.1f}"


def _fmt_threshold(t):
    return "-" if t is None else format(t, "g")   # exactly as swept (0.15 stays 0.15)


def _mean_defined(values):
    vals = [v for k, v in values.items() if v is not None]
    return sum(vals) / len(vals) if vals else None


def summary_markdown(entries):
    """The report table as Markdown: one row per entry, paper numbers beside, per-class IoU below."""
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
    return "\n".join(lines) + "\n"


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
    from voc12.dataloader import load_gt, load_img_name_list
    from misc.imutils import read_rgb
    entries = read_summary(work_dir)
    text = "# W-OoD run summary\n\n" + summary_markdown(entries)
    with atomic_path(os.path.join(work_dir, "summary.md")) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
    by_name = {e["name"]: e for e in entries}
    dirs = dirs or {n: os.path.join(work_dir, n) for n in ORDER + [SEG_SAMPLES]}
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
