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


def train_irn_on_the_gpu(gpu_run, tmp_path, name, *extra):
    """train_irn of the GPU run's IR labels again into <tmp_path>/<name>.pth; returns its state dict."""
    root, flags, work = gpu_run
    weights = tmp_path / f"{name}.pth"
    rc = run_sample.main(["--preset", "toy", *flags, "--device", "cuda", "--work_dir", str(tmp_path / name),
                          "--ir_label_out_dir", str(work / "ir_label"), "--train_list", "train",
                          "--irn_weights_name", str(weights), "--train_irn_pass", "true", *extra])
    assert rc == 0
    return torch.load(weights, weights_only=True)


def test_deterministic_train_irn_repeats_its_weights_on_the_gpu(gpu_run, tmp_path):
    """--deterministic true: two runs, the same weights (bilinear up-sampling's backward replaced); without it
    the difference is printed (cuDNN's and index_select's atomic adds)."""
    first = train_irn_on_the_gpu(gpu_run, tmp_path, "det1", "--deterministic", "true", "--num_workers", "2")
    second = train_irn_on_the_gpu(gpu_run, tmp_path, "det2", "--deterministic", "true", "--num_workers", "0")
    assert all(torch.equal(first[k], second[k]) for k in first)
    a = train_irn_on_the_gpu(gpu_run, tmp_path, "free1")
    b = train_irn_on_the_gpu(gpu_run, tmp_path, "free2")
    print("train_irn without --deterministic, largest weight difference of two runs:",
          max(float((a[k].float() - b[k].float()).abs().max()) for k in a))


def test_one_nccl_rank_trains_with_loader_workers(gpu_run, tmp_path):
    """torchrun with one process: NCCL's process group, loader workers > 0, the training steps run."""
    root, flags, work = gpu_run
    argv = ["--preset", "toy", *flags, "--device", "cuda", "--num_workers", "2", "--work_dir", str(tmp_path),
            "--cam_weights_name", str(tmp_path / "cam.pth"), "--wood_weights_name", str(tmp_path / "wood.pth"),
            "--irn_weights_name", str(tmp_path / "irn.pth"), "--ir_label_out_dir", str(tmp_path / "ir_label"),
            "--ir_label_cam_dir", str(work / "wood_advcam"), "--train_list", "train", "--seg_train_list", "train",
            "--seg_label_dir", str(work / "pseudo_mask"), "--seg_weights_name", str(tmp_path / "seg.pth"),
            "--train_cam_pass", "true", "--mine_ood_pass", "true",
            "--train_wood_pass", "true", "--cam_to_ir_label_pass", "true", "--train_irn_pass", "true",
            "--train_seg_pass", "true"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                           "run_sample.py", *argv], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert all((tmp_path / name).is_file() for name in ("cam.pth", "wood.pth", "irn.pth", "seg.pth"))
