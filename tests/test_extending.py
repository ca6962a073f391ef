"""docs/extending.md's example per-image step, run as written: resume, provenance and the pool come from
misc/steptools.py."""
import argparse
import importlib
import os
import re
import sys

import numpy as np
import pytest

from fakevoc import make_fake_voc
from misc.metrics import cam_to_label
from misc.utils import InputError, save_npz
from voc12.dataloader import read_index_png

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def example_step(folder, monkeypatch):
    """The documented step as an importable module (the CPU pool's processes import it by name)."""
    text = open(os.path.join(ROOT, "docs", "extending.md")).read()
    section = text[text.index("## Add a per-image step"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (folder / "cam_labels.py").write_text(code)
    monkeypatch.syspath_prepend(str(folder))
    return importlib.import_module("cam_labels"), len(code.strip().splitlines())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_documented_step_runs_resumes_and_records(tmp_path, num_workers, capsys, monkeypatch):
    (tmp_path / "code").mkdir()
    step, n_lines = example_step(tmp_path / "code", monkeypatch)
    assert n_lines <= 40
    voc = make_fake_voc(tmp_path / "VOC2012", n_train=3, n_val=1, size=32, seed=0)
    rng = np.random.default_rng(0)
    cams = {}
    for img_id in voc["train"]:
        keys = np.nonzero(voc["labels"][img_id])[0].astype(np.int64)
        cams[img_id] = (keys, rng.random((len(keys), 32, 32), dtype=np.float32))
        save_npz(str(tmp_path / "cams" / f"{img_id}.npz"), keys=keys, high_res=cams[img_id][1])
    args = argparse.Namespace(voc12_root=voc["root"], infer_list="train", cam_out_dir=str(tmp_path / "cams"),
                              cam_label_dir=str(tmp_path / "labels"), cam_label_thres=0.3, device="cpu",
                              num_workers=num_workers, overwrite=False)
    step.run(args)
    for img_id, (keys, high_res) in cams.items():
        assert np.array_equal(read_index_png(str(tmp_path / "labels" / f"{img_id}.png"), "a label"),
                              cam_to_label(high_res, keys, 0.3))
    os.remove(tmp_path / "labels" / f"{voc['train'][0]}.png")
    step.run(args)  # resumes: one left to do
    assert "2 already in" in capsys.readouterr().out
    sys.modules.pop("cam_labels")  # the next test's copy is imported afresh
    args.cam_label_thres = 0.5  # other inputs: the folder's outputs are refused
    with pytest.raises(InputError, match=r"made by other inputs \(cam_label_thres: 0.3 -> 0.5\)"):
        step.run(args)
