"""Evaluate pseudo masks (SPEC 5.4), IRN's step/eval_sem_seg.py.

Scores `<sem_seg_out_dir>/<id>.png` against the VOC ground truth of args.chainer_eval_set with the
metric of SPEC 4.5 over 21 classes; predictions of 255 count as background. Prints the mIoU and adds
an entry to <work_dir>/summary.json (name: args.eval_name, else the folder's name).
"""
import os

import numpy as np
from tqdm import tqdm

from misc.metrics import confusion_matrix, scores
from misc.report import add_to_summary, read_summary, summary_entry
from misc.utils import InputError, require_dir
from voc12.dataloader import load_gt, load_img_name_list, read_index_png

N_CLASSES = 21
IGNORE = 255
MAX_LISTED = 5


def prediction_as_label(pred):
    """Class values with 255 ("unsure") counted as background."""
    pred = np.array(pred, dtype=np.uint8)
    pred[pred == IGNORE] = 0
    return pred


def _pred_path(folder, img_id):
    return os.path.join(folder, img_id + ".png")


def evaluate(pred_dir, voc12_root, ids):
    """misc.metrics.scores of the predictions in `pred_dir` on `ids`; InputError if any is missing."""
    require_dir(pred_dir, "the pseudo masks <id>.png of make_sem_seg_labels")
    missing = [i for i in ids if not os.path.isfile(_pred_path(pred_dir, i))]
    if missing:
        raise InputError(f"{len(missing)} of {len(ids)} prediction(s) missing from {pred_dir}: "
                         f"{', '.join(missing[:MAX_LISTED])}{' ...' if len(missing) > MAX_LISTED else ''}; "
                         f"run make_sem_seg_labels on (at least) the evaluated list")
    confusion = np.zeros((N_CLASSES, N_CLASSES), dtype=np.int64)
    for img_id in tqdm(ids, desc="eval_sem_seg", dynamic_ncols=True):
        path = _pred_path(pred_dir, img_id)
        pred = prediction_as_label(read_index_png(path, "a single-channel pseudo-mask PNG"))
        try:
            confusion += confusion_matrix([pred], [load_gt(voc12_root, img_id)], n_class=N_CLASSES)
        except ValueError as e:  # wrong size or values outside the 21 classes
            raise InputError(f"cannot score {path} against its ground truth: {e}") from None
    return scores(confusion)


def run(args):
    read_summary(args.work_dir)  # a corrupt summary.json fails now, not after the evaluation
    ids = load_img_name_list(args.voc12_root, args.chainer_eval_set)
    result = evaluate(args.sem_seg_out_dir, args.voc12_root, ids)
    name = args.eval_name or os.path.basename(os.path.normpath(args.sem_seg_out_dir))
    add_to_summary(args.work_dir, summary_entry(name, "eval_sem_seg", result))
    print(f"eval_sem_seg: {name} mIoU {result['miou'] * 100:.2f} % on {len(ids)} images "
          f"({args.chainer_eval_set})")
