"""The CUDA path (--device cuda), on a tiny ToyVOC. Skipped without a GPU (CI has none); on a GPU machine:
`python -m pytest tests/test_cuda.py`.

- `bash bash_run_sample.sh --toy --device cuda` runs every step on the GPU and writes the report with its
  six entries (DeepLab-v2's two included).
- From that run's weights, make_cam, make_advcam and the random walk on the CPU give the GPU run's outputs
  up to float rounding (TF32 is off by default): the same code on both devices.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import run_sample
from fakevoc import TINY_TOYVOC, tiny_flags
from misc.report import read_summary
from misc.utils import load_npz
from toy import toyvoc
from voc12.dataloader import read_index_png

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    """The tiny toy pipeline run end to end on the GPU by bash_run_sample.sh; returns (root, flags, work)."""
    root = tmp_path_factory.mktemp("cuda")
    toyvoc.run(toyvoc.parse_args(["--out", str(root / "voc"), "--ood_out", str(root / "ood"), *TINY_TOYVOC]))
    flags = tiny_flags(root)
    work = root / "gpu"
    done = subprocess.run(["bash", "bash_run_sample.sh", "--toy", "--device", "cuda", "--work_dir", str(work),
                           *flags], cwd=ROOT, env=dict(os.environ, PYTHON=sys.executable),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root, flags, work


def test_the_whole_toy_pipeline_runs_on_the_gpu(gpu_run):
    _, _, work = gpu_run
    entries = {e["name"]: e for e in read_summary(str(work))}
    assert set(entries) >= {"baseline_cam", "wood_cam", "wood_advcam", "pseudo_mask", "deeplab_val",
                            "deeplab_val_crf"}
    assert all(0 <= e["miou"] <= 100 for e in entries.values())
    config = json.loads(sorted(work.glob("config-*.json"))[-1].read_text())
    assert config["device"] == "cuda"
    assert (work / "summary.md").is_file() and (work / "samples.png").is_file()


def cpu_step(gpu_run, tmp_path, *step_flags):
    root, flags, _ = gpu_run
    rc = run_sample.main(["--preset", "toy", *flags, "--device", "cpu", "--cpu_jit", "false",
                          "--work_dir", str(tmp_path), "--infer_list", "train", *step_flags])
    assert rc == 0


def max_npz_difference(dir_a, dir_b):
    names = sorted(os.listdir(dir_a))
    assert names == sorted(os.listdir(dir_b)) and len(names) == 8
    worst, total, count = 0.0, 0.0, 0
    for name in names:
        a, b = load_npz(os.path.join(dir_a, name)), load_npz(os.path.join(dir_b, name))
        assert a["keys"].tolist() == b["keys"].tolist()
        for key in ("cam", "high_res"):
            assert a[key].shape == b[key].shape
            diff = np.abs(a[key].astype(np.float64) - b[key])
            worst, total, count = max(worst, float(diff.max(initial=0))), total + diff.sum(), count + diff.size
    return worst, total / count


def test_make_cam_on_the_cpu_equals_the_gpu_run(gpu_run, tmp_path):
    _, _, work = gpu_run
    cpu_step(gpu_run, tmp_path, "--make_cam_pass", "true", "--make_cam_from", "wood",
             "--cam_out_dir", str(tmp_path / "wood_cam"))
    worst, mean = max_npz_difference(work / "wood_cam", tmp_path / "wood_cam")
    assert worst < 1e-3 and mean < 1e-5, (worst, mean)


def test_make_advcam_on_the_cpu_equals_the_gpu_run(gpu_run, tmp_path):
    _, _, work = gpu_run
    cpu_step(gpu_run, tmp_path, "--make_advcam_pass", "true", "--advcam_out_dir", str(tmp_path / "advcam"))
    worst, mean = max_npz_difference(work / "wood_advcam", tmp_path / "advcam")
    assert worst < 1e-2 and mean < 1e-4, (worst, mean)


def test_random_walk_on_the_cpu_equals_the_gpu_run(gpu_run, tmp_path):
    _, _, work = gpu_run
    cpu_step(gpu_run, tmp_path, "--make_sem_seg_pass", "true", "--sem_seg_cam_dir", str(work / "wood_advcam"),
             "--sem_seg_out_dir", str(tmp_path / "pseudo_mask"))
    names = sorted(os.listdir(work / "pseudo_mask"))
    assert names == sorted(os.listdir(tmp_path / "pseudo_mask")) and len(names) == 8
    same = total = 0
    for name in names:
        a = read_index_png(str(work / "pseudo_mask" / name), "a GPU pseudo mask")
        b = read_index_png(str(tmp_path / "pseudo_mask" / name), "a CPU pseudo mask")
        assert a.shape == b.shape
        same, total = same + (a == b).sum(), total + a.size
    assert same / total > 0.995, same / total
