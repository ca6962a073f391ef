"""Evaluate pseudo masks (docs/method.md §5.4), IRN's step/eval_sem_seg.py.

Scores `<sem_seg_out_dir>/<id>.png` against the VOC ground truth of --chainer_eval_set (misc/metrics.py, 21
classes; predictions of 255 count as background), prints the mIoU and adds an entry to <work_dir>/summary.json
(name: --eval_name, else the folder's name).
"""
import os

from misc import steptools
from misc.metrics import score_label_folder
from misc.report import add_to_summary, read_summary, summary_entry
from voc12.dataloader import load_img_name_list


def run(args):
    read_summary(args.work_dir)  # a corrupt summary.json fails now, not after the evaluation
    ids = load_img_name_list(args.voc12_root, args.chainer_eval_set)
    steptools.require_files(args.sem_seg_out_dir, ids, ".png", "pseudo masks of the evaluated list",
                            "run make_sem_seg (--make_sem_seg_pass true) on (at least) the evaluated list")
    result = score_label_folder(args.sem_seg_out_dir, args.voc12_root, ids, unsure_as_background=True,
                                desc="eval_sem_seg")
    name = args.eval_name or os.path.basename(os.path.normpath(args.sem_seg_out_dir))
    add_to_summary(args.work_dir, summary_entry(name, "eval_sem_seg", result))
    print(f"eval_sem_seg: {name} mIoU {result['miou'] * 100:.2f} % on {len(ids)} images "
          f"({args.chainer_eval_set})")
