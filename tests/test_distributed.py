"""The pipeline on 2 processes (torchrun, gloo, CPU) gives what it gives on 1 (misc/dist.py).

One pipeline (train_cam -> mine_ood -> train_wood -> make_cam -> make_advcam -> cam_to_ir_label ->
train_irn -> make_sem_seg) on a tiny fake VOC runs once in one process and once under
`torchrun --nproc_per_node 2`, each training step with one global batch per epoch:
- the training steps' weights agree within float tolerance (the gradients of the two halves of a batch are
  added instead of computed in one pass: float32 rounding, measured ~1e-7 relative), and so do the losses
  they print;
- given the same weights, the per-image steps' output files are byte-identical (each rank's files are what
  one process writes for those images);
- a 2-rank make_advcam interrupted after its first outputs and re-run with 1 process finishes them, equal
  to the uninterrupted run's.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fakevoc import TINY_TOYVOC, make_fake_voc, make_ood_pool, random_bn_statistics, tiny_flags
from misc.utils import load_torch, save_torch
from net.resnet50 import ResNet50

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH = 8
TIMEOUT_S = 300
# the weights after the same updates, the gradients summed from two halves of each batch vs computed at
# once: float32 rounding; measured max abs difference 6e-8 (train_cam, train_wood) and 7.5e-6 (IRN's
# displacement head, lr x10), 3e-5 on IRN's mean displacement (~2)
WEIGHT_RTOL, WEIGHT_ATOL = 1e-3, 1e-5
INFER_PASSES = ["--make_cam_pass", "true", "--make_advcam_pass", "true", "--cam_to_ir_label_pass", "true",
                "--make_sem_seg_pass", "true"]


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def run_driver(argv, log, nproc=1):
    """run_sample.py with `argv`, in one process or under torchrun with `nproc`; returns its output."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                if nproc > 1 else [sys.executable])
    with open(log, "w") as out:
        done = subprocess.run(launcher + ["run_sample.py", *argv], cwd=ROOT, env=_env(), stdout=out,
                              stderr=subprocess.STDOUT, timeout=TIMEOUT_S)
    text = open(log).read()
    assert done.returncode == 0, f"{' '.join(launcher)} run_sample.py failed (rc {done.returncode}):\n{text[-4000:]}"
    return text


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    voc = make_fake_voc(base / "VOC2012", n_train=4, n_val=2, size=64, seed=0)
    pool = base / "pool"
    make_ood_pool(pool, 7, pool / "candidates.txt")  # 7: the ranks' shards differ in size (4 + 3)
    torch.manual_seed(0)
    backbone = random_bn_statistics(ResNet50(width=WIDTH))
    save_torch(str(base / "backbone.pth"), backbone.state_dict())
    return base, voc


def pipeline_argv(base, voc, work):
    """Every step but the evaluations, one global batch per epoch (4 train images, 2 OoD + 2 ID for W-OoD)."""
    return ["--preset", "toy", "--device", "cpu", "--num_workers", "0", "--cpu_threads", "1", "--cpu_jit", "false",
            "--voc12_root", voc["root"], "--work_dir", str(work), "--pretrained", str(base / "backbone.pth"),
            "--backbone_width", str(WIDTH), "--train_list", "train", "--infer_list", "train",
            "--cam_weights_name", str(work / "cam.pth"), "--wood_weights_name", str(work / "wood.pth"),
            "--irn_weights_name", str(work / "irn.pth"),
            "--cam_batch_size", "4", "--cam_num_epoches", "2", "--cam_learning_rate", "0.01",
            "--cam_resize_long", "48", "64", "--cam_crop_size", "64",
            "--ood_pool_root", str(base / "pool"), "--ood_pool_list", str(base / "pool" / "candidates.txt"),
            "--ood_root", str(base / "pool"), "--mine_th", "0.0", "--ood_long_side", "64",
            "--wood_batch_size", "4", "--ood_batch_size", "2", "--wood_num_epoches", "2",
            "--wood_learning_rate", "0.001", "--cluster_K", "2", "--select_scales", "1.0", "0.5",
            "--select_eval_thres", "0.1", "0.3", "--select_every", "1", "--chainer_eval_set", "train",
            "--cam_scales", "1.0", "0.5", "--adv_iter", "2",
            "--irn_crop_size", "64", "--irn_batch_size", "2", "--irn_learning_rate", "0.01", "--irn_num_epoches", "1",
            "--irn_radius", "5",
            "--rw_radius", "5",
            *[f"--{s}_pass" for s in ()],
            "--train_cam_pass", "true", "--mine_ood_pass", "true", "--train_wood_pass", "true",
            "--make_cam_pass", "true", "--make_advcam_pass", "true", "--cam_to_ir_label_pass", "true",
            "--train_irn_pass", "true", "--make_sem_seg_pass", "true"]


def inference_argv(base, voc, work, weights_from):
    """The per-image steps only, with the weights that the run in `weights_from` trained."""
    argv = pipeline_argv(base, voc, work)
    argv = argv[:argv.index("--train_cam_pass")] + INFER_PASSES
    for flag, name in (("--cam_weights_name", "cam.pth"), ("--wood_weights_name", "wood.pth"),
                       ("--irn_weights_name", "irn.pth")):
        argv[argv.index(flag) + 1] = str(weights_from / name)
    return argv


def printed_losses(text):
    """The epoch summary numbers train_cam / train_wood / train_irn print (rank 0's log)."""
    lines = [line for line in text.splitlines()
             if re.match(r"(train_(cam|wood) epoch \d+/\d+: train loss|train_irn: epoch \d+ step)", line)]
    return [float(x) for line in lines for x in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", line.split(":", 1)[1])]


def output_files(work):
    """{relative path: bytes} of the per-image steps' outputs."""
    files = {}
    for folder in ("wood_cam", "wood_advcam", "ir_label", "pseudo_mask", "pseudo_mask_color"):
        for name in sorted(os.listdir(work / folder)):
            if name.endswith((".npz", ".png")):
                files[f"{folder}/{name}"] = (work / folder / name).read_bytes()
    return files


@pytest.fixture(scope="module")
def runs(setup):
    base, voc = setup
    one, two = base / "one", base / "two"
    text_one = run_driver(pipeline_argv(base, voc, one), base / "one.log")
    text_two = run_driver(pipeline_argv(base, voc, two), base / "two.log", nproc=2)
    return one, two, text_one, text_two


def test_two_ranks_train_the_same_weights_as_one_process(runs):
    one, two, text_one, text_two = runs
    assert "on 2 process(es)" in text_two and "on 1 process(es)" in text_one
    for name in ("cam.pth", "wood.pth", "irn.pth"):
        a, b = load_torch(str(one / name)), load_torch(str(two / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.allclose(a[key].float(), b[key].float(), rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL), (name, key)
    # the agreement means something: W-OoD moved the classifier far beyond the tolerance
    cam, wood = load_torch(str(one / "cam.pth")), load_torch(str(one / "wood.pth"))
    assert (cam["classifier.weight"] - wood["classifier.weight"]).abs().max() > 100 * WEIGHT_ATOL
    losses_one, losses_two = printed_losses(text_one), printed_losses(text_two)
    assert len(losses_one) == len(losses_two) > 10
    np.testing.assert_allclose(losses_two, losses_one, rtol=1e-3, atol=1e-4)


def test_two_ranks_write_the_same_files_as_one_process(setup, runs):
    base, voc = setup
    one = runs[0]
    shared = base / "two_same_weights"
    text = run_driver(inference_argv(base, voc, shared, one), base / "two_same_weights.log", nproc=2)
    assert "4 to do" in text
    expected, got = output_files(one), output_files(shared)
    assert len(expected) == 4 * 5 and got.keys() == expected.keys()
    assert [name for name in expected if got[name] != expected[name]] == []


def test_two_ranks_interrupted_then_one_process_finishes(setup, runs):
    base, voc = setup
    one = runs[0]
    def advcam_argv(work):  # slower AdvCAMs than the pipeline's, so that the interruption finds work left
        argv = inference_argv(base, voc, work, one)
        return argv[:argv.index("--make_cam_pass")] + ["--make_advcam_pass", "true", "--adv_iter", "27",
                                                       "--cam_scales", "1.0", "0.5", "1.5", "2.0"]
    work = base / "interrupted"
    argv = advcam_argv(work)
    out_dir = work / "wood_advcam"
    log = open(base / "interrupted.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "run_sample.py", *argv], cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + TIMEOUT_S
    finished = lambda: sorted(n for n in os.listdir(out_dir) if n.endswith(".npz")) if out_dir.is_dir() else []
    while not finished():
        assert proc.poll() is None, open(base / "interrupted.log").read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=60)
    done_before = finished()
    assert proc.returncode != 0 and 1 <= len(done_before) < 4, (proc.returncode, done_before)

    text = run_driver(argv, base / "resumed.log")   # one process, the same command
    assert f"{len(done_before)} already in" in text
    reference = base / "reference_advcam"
    run_driver(advcam_argv(reference), base / "reference.log")
    names = sorted(n for n in os.listdir(reference / "wood_advcam") if n.endswith(".npz"))
    assert finished() == names and len(names) == 4
    assert all((out_dir / n).read_bytes() == (reference / "wood_advcam" / n).read_bytes() for n in names)


def seg_argv(voc, work, extra=()):
    """DeepLab-v2 (width 4) on the ground-truth masks: 3 updates of 2 sub-batches of 3, then val predictions
    with and without CRF; a sub-batch of 3 splits 2 + 1 over two ranks."""
    return ["--preset", "toy", "--device", "cpu", "--num_workers", "0", "--cpu_threads", "1",
            "--voc12_root", voc["root"], "--work_dir", str(work), "--seg_init_weights", "none", "--seg_width", "4",
            "--seg_label_dir", os.path.join(voc["root"], "SegmentationClassAug"), "--seg_crop_size", "33",
            "--seg_batch_size", "3", "--seg_iter_size", "2", "--seg_iter_max", "3", "--seg_lr", "0.01",
            "--seg_lr_step", "2", "--train_seg_pass", "true", "--eval_seg_pass", "true", *extra]


def test_train_seg_and_eval_seg_on_two_ranks(setup):
    base, voc = setup
    one, two, same = base / "seg_one", base / "seg_two", base / "seg_two_same_weights"
    text_one = run_driver(seg_argv(voc, one), base / "seg_one.log")
    run_driver(seg_argv(voc, two), base / "seg_two.log", nproc=2)
    a, b = load_torch(str(one / "deeplab.pth")), load_torch(str(two / "deeplab.pth"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL), key
    assert "deeplab_val mIoU" in text_one
    # predictions of one process's network on two ranks: the same files
    run_driver(seg_argv(voc, same, ["--train_seg_pass", "false", "--seg_weights_name", str(one / "deeplab.pth")]),
               base / "seg_same.log", nproc=2)
    for folder in ("deeplab_val", "deeplab_val_crf"):
        names = sorted(n for n in os.listdir(one / folder) if n.endswith(".png"))
        assert len(names) == 2 and sorted(n for n in os.listdir(same / folder) if n.endswith(".png")) == names
        assert all((one / folder / n).read_bytes() == (same / folder / n).read_bytes() for n in names)
    entries = {e["name"]: e["miou"] for e in json.load(open(same / "summary.json"))}
    expected = {e["name"]: e["miou"] for e in json.load(open(one / "summary.json")) if e["name"] in entries}
    assert entries == expected and "deeplab_val_crf" in entries


def test_one_process_is_the_identity_and_batches_must_divide(monkeypatch):
    from misc import dist
    from misc.utils import InputError
    t = torch.arange(12.0).reshape(6, 2)
    assert dist.world() == 1 and dist.is_main() and dist.shard([1, 2, 3]) == [1, 2, 3]
    assert dist.batch_slice(t) is not None and torch.equal(dist.batch_slice(t), t)
    assert torch.equal(dist.gather_shards(t, 6), t) and dist.total(t) is t
    monkeypatch.setattr(dist, "world", lambda: 3)
    monkeypatch.setattr(dist, "rank", lambda: 1)
    assert dist.shard(list(range(7))) == [1, 4] and torch.equal(dist.rows(t), t[1::3])
    assert torch.equal(dist.batch_slice(t), t[2:4])
    with pytest.raises(InputError, match="--cam_batch_size 16 does not divide by the 3 processes"):
        dist.per_rank(16, "--cam_batch_size")


def test_a_batch_that_does_not_split_is_one_line_before_any_step(setup, tmp_path):
    base, voc = setup
    argv = pipeline_argv(base, voc, tmp_path / "w") + ["--cam_batch_size", "3"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "run_sample.py", *argv], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode != 0
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error")]
    assert errors == ["error: --cam_batch_size 3 does not divide by the 2 processes: the global batch is split "
                      "evenly over them; choose a batch size or a process count that divides"]
    assert not (tmp_path / "w").exists()  # nothing written, not even the config


def test_bash_run_sample_on_two_processes(tmp_path):
    """`bash bash_run_sample.sh --toy --nproc 2`: every stage under torchrun on a tiny ToyVOC, one report."""
    from toy import toyvoc
    toyvoc.run(toyvoc.parse_args(["--out", str(tmp_path / "voc"), "--ood_out", str(tmp_path / "ood"), *TINY_TOYVOC]))
    torch.manual_seed(0)
    save_torch(str(tmp_path / "backbone.pth"), random_bn_statistics(ResNet50(width=WIDTH)).state_dict())
    flags = tiny_flags(tmp_path)
    flags[flags.index("--pretrained") + 1] = str(tmp_path / "backbone.pth")  # not from scratch: frozen BatchNorm
    work = tmp_path / "w"
    done = subprocess.run(["bash", "bash_run_sample.sh", "--toy", "--nproc", "2", "--device", "cpu",
                           "--work_dir", str(work), *flags, "--cam_learning_rate", "0.01",
                           "--wood_learning_rate", "0.001", "--irn_learning_rate", "0.01"],
                          cwd=ROOT, env=dict(_env(), PYTHON=sys.executable), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    entries = {e["name"] for e in json.load(open(work / "summary.json"))}
    assert entries >= {"baseline_cam", "wood_cam", "wood_advcam", "pseudo_mask", "deeplab_val", "deeplab_val_crf"}
    configs = [json.loads(p.read_text()) for p in sorted(work.glob("config-*.json"))]
    assert len(configs) >= 5 and all(c["world_size"] == 2 for c in configs)
    assert (work / "summary.md").is_file()
