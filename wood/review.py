"""The human check of mined hard OoD (docs/method.md §4.2) as one static page: what fooled the ID classifier,
marks of the candidates that do show a class, and the exclusion file `mine_ood --mine_exclude` reads.

mine_ood calls `write_review_page` on rank 0 after scoring the pool. Contract:
- written: <work_dir>/ood_review.html (REVIEW_PAGE) and, beside it, <work_dir>/ood_review/ (REVIEW_DIR) with two
  JPEGs per card, `<stem>.jpg` (the image) and `<stem>_cam.jpg` (the overlay), stem = a hash of the candidate
  path; every file atomically (images first, the page last), and images of earlier runs that the page no longer
  shows removed. The page needs no server and no network: it opens from disk in any browser.
- cards: every candidate above --mine_th (kept; excluded by --mine_exclude, shown marked; over --mine_max_keep)
  and then the `n_below` best ones below it (greyed), highest score first, ties in list order (`shown_order`).
  Each card: the image, its score, its top class, and the CAM of that class overlaid on the image.
- the overlay: the CAM maths of misc/cam.py (make_cam's recipe: the image and its flip) at ONE scale (1.0) on
  the ID classifier, on the image as mine_ood scored it (long side --ood_long_side), normalised by its maximum,
  in jet-like colours (blue low, red high) blended on the image (`jet_colours`, `blend_overlay`). One forward
  of the (image, flip) pair per shown card, under torch.inference_mode().
- the page: REVIEW_TEMPLATE (plain HTML/CSS/JS, no framework) with a JSON blob (`page_data`) in place of
  DATA_PLACEHOLDER. Marks live in the browser's localStorage under `storage_key` (classifier + candidate list),
  start from the exclusion file the page was made with, and "Export" downloads them in `read_exclusions`'
  format: '#' comment header, then paths relative to --ood_pool_root, one per line.
"""
import datetime
import hashlib
import json
import os
import re
import shlex

import numpy as np
import torch
from PIL import Image

from misc import imutils, provenance
from misc.cam import image_cam
from misc.utils import atomic_path
from voc12.dataloader import CAT_LIST

REVIEW_PAGE = "ood_review.html"
REVIEW_DIR = "ood_review"
REVIEW_TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "review_template.html")
DATA_PLACEHOLDER = "/*REVIEW_DATA*/null"
EXCLUDE_FILE_NAME = "ood_exclude.txt"   # the exported file's name, and where the page suggests to put it
STORAGE_PREFIX = "wood-ood-review:"     # localStorage key prefix: every file:// page shares one origin
REVIEW_CAM_SCALE = 1.0                  # the one CAM scale of the overlays (make_cam uses several)
THUMB_LONG_SIDE = 160                   # card images (px): two side by side fit three cards on a laptop screen
OVERLAY_ALPHA = 0.5                     # weight of the CAM colours over the image
JPEG_QUALITY = 85
STEM_CHARS = 16                         # hex digits of the path hash naming a card's files
_CARD_FILE = re.compile(r"^[0-9a-f]{%d}(_cam)?\.jpg$" % STEM_CHARS)
ABOVE_THRESHOLD = ("kept", "excluded", "over_cap")   # mine_ood's reasons of the candidates above --mine_th


# ------------------------------------------------------------------------------------------ pure parts

def shown_order(scores, reasons, n_below):
    """Indices of the candidates on the page: all above the threshold (reason kept / excluded / over_cap), then
    the `n_below` best below it; highest score first, ties in list order (as mine_ood's selection)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    above = [int(i) for i in order if reasons[i] in ABOVE_THRESHOLD]
    below = [int(i) for i in order if reasons[i] not in ABOVE_THRESHOLD]
    return above + below[:max(0, n_below)]


def jet_colours(values):
    """Jet-like colour map: values in [0, 1] (any shape, clipped) -> uint8 RGB (..., 3); 0 dark blue, 0.5 green,
    1 dark red (each channel a clipped tent of the value)."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)[..., None]
    centres = np.array([3.0, 2.0, 1.0])  # red, green, blue peaks at v = 3/4, 1/2, 1/4
    rgb = np.clip(1.5 - np.abs(4.0 * v - centres), 0.0, 1.0)
    return np.round(rgb * 255).astype(np.uint8)


def blend_overlay(rgb, cam, alpha=OVERLAY_ALPHA):
    """(1 - alpha) * image + alpha * jet(cam), rounded: rgb uint8 (H, W, 3), cam (H, W) in [0, 1] -> uint8."""
    rgb = np.asarray(rgb)
    cam = np.asarray(cam)
    if cam.shape != rgb.shape[:2]:
        raise ValueError(f"the CAM {cam.shape} and the image {rgb.shape[:2]} differ in size")
    mixed = (1.0 - alpha) * rgb.astype(np.float64) + alpha * jet_colours(cam).astype(np.float64)
    return np.clip(np.round(mixed), 0, 255).astype(np.uint8)


def resize_long(rgb, long_side):
    """The image with its long side resized (bicubic) to `long_side`: what mine_ood's OoDFeatureDataset feeds
    the classifier (imutils.random_resize_long with lo = hi, without drawing from the generator)."""
    height, width = np.asarray(rgb).shape[:2]
    return imutils.rescale(rgb, long_side / max(height, width), 3)


def flip_pair(rgb):
    """The CAM net's input of one image at scale 1.0: (2, 3, H, W) float32 [normalised image, its flip]."""
    chw = imutils.hwc_to_chw(imutils.normalize(rgb))
    return np.ascontiguousarray(np.stack([chw, np.flip(chw, -1)], axis=0))


def card_stem(path):
    """A file-name-safe stem for a candidate path (its files under REVIEW_DIR)."""
    return hashlib.sha256(path.encode()).hexdigest()[:STEM_CHARS]


def storage_key(weights_digest, candidates_digest):
    """The page's localStorage key: one per (classifier, candidate list), so two pages never share marks, and a
    page re-made after a re-mine (same classifier and list) resumes the marks."""
    both = f"{weights_digest}\n{candidates_digest}".encode()
    return STORAGE_PREFIX + hashlib.sha256(both).hexdigest()[:STEM_CHARS]


def remine_command(args, exclude_path):
    """The driver command that re-mines with `exclude_path` as --mine_exclude: mine_ood's decisive flags as this
    run had them, and --overwrite true (a list recorded with another exclusion file is otherwise refused)."""
    flags = [("--work_dir", args.work_dir), ("--cam_weights_name", args.cam_weights_name),
             ("--backbone_width", getattr(args, "backbone_width", None)),
             ("--ood_pool_root", args.ood_pool_root), ("--ood_pool_list", args.ood_pool_list),
             ("--ood_list", args.ood_list), ("--ood_long_side", args.ood_long_side), ("--mine_th", args.mine_th),
             ("--mine_max_keep", args.mine_max_keep), ("--mine_exclude", exclude_path),
             ("--mine_ood_pass", "true"), ("--overwrite", "true")]
    preset = getattr(args, "preset", None)
    words = ["python", "run_sample.py"] + (["--preset", preset] if preset else [])
    for flag, value in flags:
        if value is not None:
            words += [flag, shlex.quote(str(value))]
    return " ".join(words)


def card_entry(path, score, top_class, reason, stem):
    """One card of the page's data (image paths relative to the page)."""
    return {"path": path, "score": round(float(score), 6), "top_class": CAT_LIST[int(top_class)],
            "status": reason, "image": f"{REVIEW_DIR}/{stem}.jpg", "overlay": f"{REVIEW_DIR}/{stem}_cam.jpg"}


def page_data(args, cards, reasons, exclusions, n_below_shown, key):
    """The JSON blob of the page: what it was made from, the counts, the cards and the starting marks."""
    exclude_target = args.mine_exclude or os.path.join(args.work_dir, EXCLUDE_FILE_NAME)
    counts = {"candidates": len(reasons), "kept": reasons.count("kept"), "excluded": reasons.count("excluded"),
              "over_cap": reasons.count("over_cap"), "below_shown": n_below_shown,
              "below_total": reasons.count("below_threshold")}
    return {"classifier": args.cam_weights_name, "candidates": args.ood_pool_list, "pool_root": args.ood_pool_root,
            "threshold": args.mine_th, "max_keep": args.mine_max_keep, "long_side": args.ood_long_side,
            "exclusion_file": args.mine_exclude, "exclude_target": exclude_target,
            "exclude_file_name": os.path.basename(exclude_target),
            "remine_command": remine_command(args, exclude_target), "storage_key": key, "counts": counts,
            "cam_scale": REVIEW_CAM_SCALE, "classes": list(CAT_LIST), "exclusions": sorted(exclusions),
            "cards": cards, "written": datetime.datetime.now().isoformat(timespec="seconds")}


def render_page(template, data):
    """The template with the JSON data in place of its single DATA_PLACEHOLDER ('</' escaped, so that no path
    can close the <script> element)."""
    if template.count(DATA_PLACEHOLDER) != 1:
        raise ValueError(f"the review template must hold {DATA_PLACEHOLDER} exactly once")
    blob = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")
    return template.replace(DATA_PLACEHOLDER, blob)


# ------------------------------------------------------------------------------------------------ I/O

def top_class_cam(model, rgb, top_class, device):
    """(H, W) float32 CAM in [0, 1] of class `top_class` for the uint8 image `rgb` (already at the scored size):
    misc/cam.py's image_cam on the (image, flip) pair, one scale."""
    label = np.zeros(len(CAT_LIST), np.float32)
    label[int(top_class)] = 1
    with torch.inference_mode():
        arrays = image_cam(model, [flip_pair(rgb)], rgb.shape[:2], label, device)
    return arrays["high_res"][0]


def _save_jpeg(path, rgb, size):
    img = Image.fromarray(np.ascontiguousarray(rgb)).resize((size[1], size[0]), Image.Resampling.BICUBIC)
    with atomic_path(path) as tmp:
        img.save(tmp, format="JPEG", quality=JPEG_QUALITY)


def write_card_images(model, device, pool_root, path, top_class, long_side, out_dir, stem):
    """The card's image and overlay JPEGs (long side THUMB_LONG_SIDE)."""
    rgb = resize_long(imutils.read_rgb(os.path.join(pool_root, path)), long_side)
    cam = top_class_cam(model, rgb, top_class, device)
    size = imutils.scaled_size(rgb.shape[0], rgb.shape[1], THUMB_LONG_SIDE / max(rgb.shape[:2]))
    _save_jpeg(os.path.join(out_dir, f"{stem}.jpg"), rgb, size)
    _save_jpeg(os.path.join(out_dir, f"{stem}_cam.jpg"), blend_overlay(rgb, cam), size)


def remove_stale_card_files(out_dir, stems):
    """Remove the card images of earlier runs that this page does not show (only files named like ours)."""
    keep = {f"{s}.jpg" for s in stems} | {f"{s}_cam.jpg" for s in stems}
    for name in os.listdir(out_dir):
        if _CARD_FILE.match(name) and name not in keep:
            os.remove(os.path.join(out_dir, name))


def write_review_page(args, cam_model, paths, scores, tops, reasons, exclusions, n_below):
    """Write the review page of one mining (rank 0 only; see the module's contract); returns its path.

    cam_model: the ID classifier (args.cam_weights_name) with the CAM forward (net.resnet50_cam.CAM), on
    args.device, in eval mode; paths / scores / tops / reasons: per candidate, as mine_ood computed them;
    exclusions: the set of paths of the --mine_exclude file (the page's starting marks); n_below: how many
    below --mine_th to show greyed.
    """
    shown = shown_order(scores, reasons, n_below)
    out_dir = os.path.join(args.work_dir, REVIEW_DIR)
    os.makedirs(out_dir, exist_ok=True)
    device = torch.device(args.device)
    cards = []
    for i in shown:
        stem = card_stem(paths[i])
        write_card_images(cam_model, device, args.ood_pool_root, paths[i], tops[i], args.ood_long_side, out_dir, stem)
        cards.append(card_entry(paths[i], scores[i], tops[i], reasons[i], stem))
    remove_stale_card_files(out_dir, [card_stem(paths[i]) for i in shown])
    key = storage_key(provenance.file_digest(args.cam_weights_name), provenance.file_digest(args.ood_pool_list))
    n_below_shown = sum(reasons[i] not in ABOVE_THRESHOLD for i in shown)
    data = page_data(args, cards, list(reasons), exclusions, n_below_shown, key)
    with open(REVIEW_TEMPLATE, encoding="utf-8") as f:
        html = render_page(f.read(), data)
    page = os.path.join(args.work_dir, REVIEW_PAGE)
    with atomic_path(page) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(html)
    return page
