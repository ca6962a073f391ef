"""Mine hard OoD images from a candidate pool (docs/method.md §4.2; the paper's procedure, not in the released code).

The candidates (args.ood_pool_root / args.ood_pool_list) are images known to contain none of the
classes. The ID classifier (args.cam_weights_name) scores each one, full image with its long side
resized to args.ood_long_side: score = max_c sigmoid(logits)_c. A candidate fooling the classifier
(score > args.mine_th) is a hard OoD. Kept: the hard ones not listed in args.mine_exclude (the
human check), sorted by score (highest first, ties in list order), at most args.mine_max_keep.

Writes --ood_list (paths relative to --ood_pool_root, the --ood_root of train_wood) with its provenance
record (a list made by the same inputs, or a released one without a record, is kept and the step skipped),
<work_dir>/ood_scores.tsv (every candidate: path, score, top class, kept, why), the contact sheets
<work_dir>/ood_contact*.png and the review page <work_dir>/ood_review.html (wood/review.py, docs/review.md):
the kept candidates and the --review_below best below the threshold (greyed) with the CAM of their top class
(scale 1.0), whose marks export the --mine_exclude file.
When the pool has a ToyVOC manifest (<ood_pool_root>/manifest.json, [{"path", "hard", "cue"}]) the
step prints the precision and recall of the kept list against its "hard" flags.
"""
import json
import os

import numpy as np
import torch
from torch.utils.data import Subset
from tqdm import tqdm

from misc import dist, imutils, provenance, steptools
from misc.utils import InputError, atomic_path, require_file
from net.classifier import load_classifier
from voc12.dataloader import CAT_LIST
from wood.data import OoDFeatureDataset, load_ood_list
from wood.mining import hard_ood_scores, mining_quality, select_hard_ood
from wood.review import write_review_page

MANIFEST = "manifest.json"
SCORE_TABLE = "ood_scores.tsv"
CONTACT_SHEET = "ood_contact.png"
CONTACT_THUMB = 128        # thumbnail box (px)
CONTACT_COLUMNS = 10
CONTACT_PER_PAGE = 100
CONTACT_TEXT_HEIGHT = 14   # caption strip under each thumbnail (px)


# -------------------------------------------------------------------------------------------- I/O

def read_exclusions(path, pool_paths):
    """The set of candidate paths listed in the exclusion file (blank lines and '#' comments skipped)."""
    if not path:
        return set()
    require_file(path, "an exclusion file: candidate paths (relative to --ood_pool_root) rejected by "
                       "the human check, one per line")
    with open(path) as f:
        listed = {line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")}
    unknown = sorted(listed - set(pool_paths))
    if unknown:
        print(f"mine_ood: {len(unknown)} path(s) of {path} are not candidates (ignored), e.g. {unknown[0]}")
    return listed


def score_candidates(model, dataset, device, num_workers):
    """(N, C) logits of every candidate (batch 1: full images of different sizes). Under torchrun each rank
    scores its share and every rank gets all the logits."""
    logits, n = [], len(dataset)
    with torch.inference_mode():
        mine = Subset(dataset, dist.shard(list(range(n))))
        for pack in tqdm(steptools.checked_batches(mine, batch_size=1, shuffle=False, num_workers=num_workers),
                         total=len(mine), desc="mine_ood"):
            logits.append(model(pack["img"].to(device)).float().cpu())
    return dist.gather_shards(torch.cat(logits), n)


def write_lines(path, lines):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write("".join(line + "\n" for line in lines))


def write_score_table(path, paths, scores, top, reasons):
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    rows = ["path\tscore\ttop_class\tkept\treason"]
    for i in order:
        rows.append(f"{paths[i]}\t{scores[i]:.6f}\t{CAT_LIST[top[i]]}\t{int(reasons[i] == 'kept')}\t{reasons[i]}")
    write_lines(path, rows)


def contact_sheet_paths(work_dir, n_images):
    n_pages = max(1, -(-n_images // CONTACT_PER_PAGE))
    base, ext = os.path.splitext(CONTACT_SHEET)
    return [os.path.join(work_dir, CONTACT_SHEET if p == 0 else f"{base}_{p + 1}{ext}") for p in range(n_pages)]


def write_contact_sheets(work_dir, root, paths, captions):
    """Grid(s) of thumbnails, each captioned; returns the files written."""
    from PIL import Image, ImageDraw
    files = contact_sheet_paths(work_dir, len(paths))
    cell_h = CONTACT_THUMB + CONTACT_TEXT_HEIGHT
    for page, out in enumerate(files):
        items = list(zip(paths, captions))[page * CONTACT_PER_PAGE:(page + 1) * CONTACT_PER_PAGE]
        cols = max(1, min(CONTACT_COLUMNS, len(items)))
        rows = max(1, -(-len(items) // cols))
        sheet = Image.new("RGB", (cols * CONTACT_THUMB, rows * cell_h), "white")
        draw = ImageDraw.Draw(sheet)
        for k, (rel, caption) in enumerate(items):
            thumb = Image.fromarray(imutils.read_rgb(os.path.join(root, rel)))
            thumb.thumbnail((CONTACT_THUMB, CONTACT_THUMB))
            x, y = (k % cols) * CONTACT_THUMB, (k // cols) * cell_h
            sheet.paste(thumb, (x + (CONTACT_THUMB - thumb.width) // 2, y + (CONTACT_THUMB - thumb.height) // 2))
            draw.text((x + 2, y + CONTACT_THUMB + 1), caption, fill="black")
        with atomic_path(out) as tmp:
            sheet.save(tmp, format="PNG")
    return files


def read_manifest(pool_root):
    path = os.path.join(pool_root, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        return [{"path": e["path"], "hard": bool(e["hard"]), "cue": e.get("cue")} for e in manifest]
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"cannot read {path} ({type(e).__name__}: {e}); expected a JSON list of "
                         f'{{"path", "hard", "cue"}} entries (written by toy.toyvoc)') from None


def provenance_inputs(args):
    """What decides the mined list (misc/provenance.py)."""
    return {"id_weights": provenance.input_file(args.cam_weights_name, "the ID classifier weights (.pth); run "
                                                                        "train_cam (--train_cam_pass true) first"),
            "candidates": provenance.input_file(args.ood_pool_list, "the candidate OoD list (--ood_pool_list)"),
            "exclusions": provenance.file_digest(args.mine_exclude),
            **provenance.flag_values(args, ["ood_pool_root", "backbone_width", "ood_long_side", "mine_th",
                                            "mine_max_keep"]),
            **provenance.non_default_flags(args, {"backbone": "resnet50"})}


def run(args):
    # a released list needs no candidate pool: its inputs are computed only to compare with a record
    if steptools.keep_existing(args.ood_list, "mine_ood", lambda: provenance_inputs(args), args, "--ood_list"):
        return
    inputs = provenance_inputs(args)
    device = torch.device(args.device)
    paths = load_ood_list(args.ood_pool_root, args.ood_pool_list)
    excluded = read_exclusions(args.mine_exclude, paths)
    model = load_classifier(args.cam_weights_name, args.backbone, args.backbone_width, args.device, "features")
    dataset = OoDFeatureDataset(args.ood_pool_root, paths, long_side=args.ood_long_side)
    score, top = hard_ood_scores(score_candidates(model, dataset, device, args.num_workers))
    score, top = score.tolist(), top.tolist()
    kept, reasons = select_hard_ood(score, args.mine_th, [p in excluded for p in paths], args.mine_max_keep)
    if not dist.is_main():  # rank 0 writes the list and the reports
        return

    write_score_table(os.path.join(args.work_dir, SCORE_TABLE), paths, score, top, reasons)
    n_hard = sum(s > args.mine_th for s in score)
    print(f"mine_ood: {len(paths)} candidates, {n_hard} with max p > {args.mine_th}, "
          f"{sum(r == 'excluded' for r in reasons)} excluded"
          + (f" (listed in {args.mine_exclude})" if args.mine_exclude else "") + f", {len(kept)} kept "
          f"(score table {os.path.join(args.work_dir, SCORE_TABLE)})")
    # before the no-candidate check: the page also shows the best ones below the threshold. Its overlays need
    # the CAM forward of the same weights (a "cam" net); a hand-made namespace (a test's) shows kept ones only
    cam_model = load_classifier(args.cam_weights_name, args.backbone, args.backbone_width, args.device, "cam")
    page = write_review_page(args, cam_model, paths, score, top, reasons, excluded,
                             getattr(args, "review_below", 0))
    print(f"mine_ood: review page {page} (open it in a browser: mark, export the --mine_exclude file; "
          f"docs/review.md)")
    if not kept:
        raise InputError(f"mine_ood kept no candidate of {args.ood_pool_list}: the ID classifier "
                         f"{args.cam_weights_name} is fooled by none (max p > --mine_th {args.mine_th}) "
                         f"or all were excluded; lower --mine_th or add candidates")
    kept_paths = [paths[i] for i in kept]
    sheets = write_contact_sheets(args.work_dir, args.ood_pool_root, kept_paths,
                                  [f"{score[i]:.3f} {CAT_LIST[top[i]]}" for i in kept])
    provenance.forget_file(args.ood_list)
    write_lines(args.ood_list, kept_paths)
    provenance.record_file(args.ood_list, "mine_ood", inputs)
    print(f"mine_ood: wrote {args.ood_list} ({len(kept)} images, scores {score[kept[0]]:.3f} .. "
          f"{score[kept[-1]]:.3f}); contact sheet {', '.join(sheets)}")
    if args.ood_root and os.path.abspath(args.ood_root) != os.path.abspath(args.ood_pool_root):
        print(f"mine_ood: note: the list is relative to {args.ood_pool_root} but --ood_root is {args.ood_root}")
    manifest = read_manifest(args.ood_pool_root)
    if manifest is not None:
        q = mining_quality(kept_paths, manifest)
        print(f"mine_ood: against {os.path.join(args.ood_pool_root, MANIFEST)}: precision {q['precision']:.3f} "
              f"({q['true_positives']}/{q['kept']}), recall {q['recall']:.3f} ({q['true_positives']}/{q['hard']})")
