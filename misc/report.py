"""The run's result table: every evaluation step adds one entry to <work_dir>/summary.json."""
import json
import os

import numpy as np

from misc.utils import save_json

def _class_names():  # imported late: voc12 pulls in torch
    from voc12.dataloader import CAT_LIST
    return ["background"] + list(CAT_LIST)


def _percent_or_none(x):
    return None if not np.isfinite(x) else round(float(x) * 100, 2)


def summary_entry(name, step, scores, threshold=None):
    """A JSON-ready entry from misc.metrics.scores(); values in %, undefined classes as null."""
    names = _class_names()
    per_class = lambda key: {n: _percent_or_none(v) for n, v in zip(names, scores[key])}
    return {"name": name, "step": step, "miou": _percent_or_none(scores["miou"]),
            "iou": per_class("iou"), "precision": per_class("precision"), "recall": per_class("recall"),
            "threshold": threshold}


def read_summary(work_dir):
    path = os.path.join(work_dir, "summary.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return json.load(f)


def add_to_summary(work_dir, entry):
    """Add (or replace, by name) one entry of <work_dir>/summary.json, written atomically."""
    entries = [e for e in read_summary(work_dir) if e["name"] != entry["name"]]
    entries.append(entry)
    save_json(os.path.join(work_dir, "summary.json"), entries)
    return entries
