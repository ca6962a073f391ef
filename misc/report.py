"""The run's result table: every evaluation step adds one entry to <work_dir>/summary.json."""
import json
import os

import numpy as np

from misc.utils import InputError, save_json


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
    """The entries of <work_dir>/summary.json ([] if there is none); InputError if it is corrupt (the eval
    steps call this before they evaluate, so a bad file costs no evaluation)."""
    path = os.path.join(work_dir, "summary.json")
    if not os.path.isfile(path):
        return []
    try:
        with open(path) as f:
            entries = json.load(f)
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "name" in e for e in entries):
            raise ValueError("expected a list of entries with a 'name'")
    except (ValueError, OSError) as e:
        raise InputError(f"cannot read {path} ({e}): repair it, or move it away to start a new summary") from None
    return entries


def add_to_summary(work_dir, entry):
    """Add (or replace, by name) one entry of <work_dir>/summary.json, written atomically."""
    entries = [e for e in read_summary(work_dir) if e["name"] != entry["name"]]
    entries.append(entry)
    save_json(os.path.join(work_dir, "summary.json"), entries)
    return entries
