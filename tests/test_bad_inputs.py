"""Bad inputs, odd flags and stale outputs: each case exits with a status other than 0, prints one line
that names the flag or file and the fix, and writes or changes no output."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import run_sample
from misc.torchutils import TrainingDiverged, require_finite
from misc.utils import load_npz
from test_resume import (EXIT_TIMEOUT_S, LAUNCHER, ROOT, START_TIMEOUT_S, make_cam_argv, make_random_weights,
                         subprocess_env, tail)

WIDTH = 8


def error_line(capsys):
    """The driver's one error line (stderr), asserting there is exactly one and no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def train_cam_argv(fake_voc, tmp_path, *extra):
    return ["--preset", "toy", "--work_dir", str(tmp_path / "work"), "--voc12_root", fake_voc["root"],
            "--train_cam_pass", "true", "--cam_weights_name", str(tmp_path / "sess" / "cam.pth"),
            "--backbone_width", str(WIDTH), "--pretrained", "none", "--device", "cpu", "--num_workers", "0",
            "--cam_batch_size", "2", "--cam_num_epoches", "1", "--cam_crop_size", "64",
            "--cam_resize_long", "48", "80", *extra]


# ------------------------------------------------------------------------------------ training guards

def test_nan_loss_stops_train_cam_and_saves_nothing(fake_voc, tmp_path, capsys):
    rc = run_sample.main(train_cam_argv(fake_voc, tmp_path, "--cam_learning_rate", "1e8"))
    assert rc == 2
    line = error_line(capsys)
    assert "train_cam diverged" in line and "iteration" in line and "--cam_learning_rate 1e+08" in line, line
    assert not (tmp_path / "sess" / "cam.pth").exists()
    assert not (tmp_path / "sess").exists() or os.listdir(tmp_path / "sess") == []


@pytest.mark.parametrize("where", ["loss", "gradient", "weights"])
def test_require_finite_names_step_iteration_and_flags(where):
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, float("inf") if where == "gradient" else 1.0, 1.0])
    loss = torch.tensor(float("nan") if where == "loss" else 0.5)
    state = {"w": torch.tensor([1.0, float("nan") if where == "weights" else 2.0]), "n": torch.tensor(3)}
    flags = {"--irn_learning_rate": 0.1}
    with pytest.raises(TrainingDiverged) as e:
        require_finite("train_irn", 2, 7, flags, loss, [p], state)
    message = str(e.value)
    assert message.startswith("train_irn diverged:") and "epoch 2 iteration 7" in message
    assert "--irn_learning_rate 0.1" in message and "nothing was saved" in message
    assert {"loss": "the loss is nan", "gradient": "a gradient", "weights": "(e.g. w)"}[where] in message
    p.grad = torch.ones(3)
    require_finite("train_irn", 2, 7, flags, torch.tensor(0.5), [p], {"w": torch.ones(2)})  # all finite: passes


# ------------------------------------------------------------------------------- stale outputs (provenance)

def cam_files(folder):
    """{name: (inode, mtime)} of the CAM files in `folder`: what must not change when a step refuses."""
    return {n: (os.stat(folder / n).st_ino, os.stat(folder / n).st_mtime_ns)
            for n in sorted(os.listdir(folder)) if n.endswith(".npz")}


@pytest.fixture
def id_cams(fake_voc, tmp_path):
    """CAMs of an 'ID classifier' (random weights) in tmp_path/cam, made by the driver; (argv, folder)."""
    make_random_weights(tmp_path / "id.pth")
    cam_dir = tmp_path / "cam"
    argv = make_cam_argv(fake_voc, tmp_path / "id.pth", tmp_path / "work", cam_dir)
    assert run_sample.main(argv) == 0
    assert len(cam_files(cam_dir)) == 6
    return argv, cam_dir


def test_wood_cams_into_a_folder_of_id_cams_stop_then_overwrite(fake_voc, tmp_path, id_cams, capsys):
    # what `bash_run_sample.sh --cam_out_dir X` runs: the ID stage, then the W-OoD stage, both into X
    argv, cam_dir = id_cams
    make_random_weights(tmp_path / "wood.pth", seed=1)
    wood_argv = argv + ["--make_cam_from", "wood", "--wood_weights_name", str(tmp_path / "wood.pth")]
    before = cam_files(cam_dir)
    capsys.readouterr()
    assert run_sample.main(wood_argv) == 2
    line = error_line(capsys)
    assert f"{cam_dir} holds 6 make_cam output(s) made by other inputs" in line, line
    assert "classifier: id -> wood" in line and "--overwrite" in line and "--cam_out_dir" in line, line
    assert cam_files(cam_dir) == before

    assert run_sample.main(wood_argv + ["--overwrite", "true"]) == 0
    fresh = tmp_path / "fresh"
    assert run_sample.main(wood_argv + ["--cam_out_dir", str(fresh)]) == 0
    assert sorted(cam_files(cam_dir)) == sorted(cam_files(fresh))
    for name in cam_files(fresh):
        a, b = load_npz(str(cam_dir / name)), load_npz(str(fresh / name))
        assert all(np.array_equal(a[k], b[k]) for k in b), name
    assert json.loads((cam_dir / "provenance.json").read_text())["inputs"]["classifier"] == "wood"


def test_retrained_classifier_stops_make_cam(fake_voc, tmp_path, id_cams, capsys):
    argv, cam_dir = id_cams
    before = cam_files(cam_dir)
    make_random_weights(tmp_path / "id.pth", seed=2)  # the same path, retrained
    capsys.readouterr()
    assert run_sample.main(argv) == 2
    line = error_line(capsys)
    assert "weights: sha256:" in line and "--overwrite" in line, line
    assert cam_files(cam_dir) == before


def test_changed_scales_stop_make_cam_and_the_same_flags_resume(fake_voc, tmp_path, id_cams, capsys):
    argv, cam_dir = id_cams
    before = cam_files(cam_dir)
    capsys.readouterr()
    assert run_sample.main(argv + ["--cam_scales", "1.0", "0.5"]) == 2
    assert "cam_scales: [1.0, 0.5, 1.5, 2.0] -> [1.0, 0.5]" in error_line(capsys)
    assert cam_files(cam_dir) == before
    os.remove(cam_dir / sorted(before)[0])
    assert run_sample.main(argv) == 0  # the same inputs: resumes, the others kept as they are
    assert "5 already in" in capsys.readouterr().out
    after = cam_files(cam_dir)
    assert {n: s for n, s in after.items() if n != sorted(before)[0]} == {
        n: s for n, s in before.items() if n != sorted(before)[0]}


def test_outputs_without_a_record_and_a_corrupt_record_stop(fake_voc, tmp_path, id_cams, capsys):
    argv, cam_dir = id_cams
    manifest = cam_dir / "provenance.json"
    manifest.write_text("{not json")
    capsys.readouterr()
    assert run_sample.main(argv) == 2
    line = error_line(capsys)
    assert f"cannot read the provenance record {manifest}" in line and "--overwrite" in line, line
    manifest.unlink()
    before = cam_files(cam_dir)
    assert run_sample.main(argv) == 2
    line = error_line(capsys)
    assert "6 .npz file(s) with no provenance record" in line and "--cam_out_dir" in line, line
    assert cam_files(cam_dir) == before


def test_stale_temp_files_of_a_killed_run_are_removed(fake_voc, tmp_path, id_cams):
    argv, cam_dir = id_cams
    leftover = cam_dir / ".2007_000001.npz.abc123.tmp"
    leftover.write_bytes(b"half a file")
    assert run_sample.main(argv) == 0
    assert not leftover.exists()


def test_id_cams_default_to_a_folder_named_for_them():
    a = run_sample.parse_args(["--work_dir", "/tmp/w", "--make_cam_from", "id", "--make_advcam_from", "id"])
    assert a.cam_out_dir == "/tmp/w/id_cam" == a.eval_cam_dir and a.advcam_out_dir == "/tmp/w/id_advcam"
    b = run_sample.parse_args(["--work_dir", "/tmp/w"])
    assert b.cam_out_dir == "/tmp/w/wood_cam" and b.advcam_out_dir == "/tmp/w/wood_advcam"


def test_weights_of_other_flags_stop_training_and_the_same_flags_skip(fake_voc, tmp_path, capsys):
    weights = tmp_path / "sess" / "cam.pth"
    assert run_sample.main(train_cam_argv(fake_voc, tmp_path)) == 0
    stamp = os.stat(weights).st_mtime_ns
    assert run_sample.main(train_cam_argv(fake_voc, tmp_path)) == 0
    assert "trained with these flags; keeping it" in capsys.readouterr().out
    assert run_sample.main(train_cam_argv(fake_voc, tmp_path, "--cam_learning_rate", "0.01")) == 2
    line = error_line(capsys)
    assert f"{weights} was made by other inputs (cam_learning_rate: 0.1 -> 0.01)" in line, line
    assert "--overwrite" in line and "--cam_weights_name" in line, line
    assert os.stat(weights).st_mtime_ns == stamp
    os.remove(str(weights) + ".provenance.json")
    assert run_sample.main(train_cam_argv(fake_voc, tmp_path)) == 2
    assert "exists with no provenance record" in error_line(capsys)
    assert os.stat(weights).st_mtime_ns == stamp


# ------------------------------------------------------------------------------------ flags and driver

@pytest.mark.parametrize("flags,expected", [
    (["--adv_iter", "0"], "--adv_iter 0: must be an integer >= 1"),
    (["--adv_iter", "-1"], "--adv_iter -1: must be an integer >= 1"),
    (["--cam_scales", "1.0", "0"], "--cam_scales 0.0: must be a number > 0"),
    (["--num_workers", "-1"], "--num_workers -1: must be an integer >= 0"),
    (["--cam_eval_thres", "1.5"], "--cam_eval_thres 1.5: must be a number in [0, 1]"),
    (["--cam_learning_rate", "nan"], "--cam_learning_rate nan: must be a finite number > 0"),
    (["--device", "foo"], "--device foo is not a device: use cpu, cuda or cuda:<index>"),
    (["--conf_bg_thres", "0.5"], "--conf_bg_thres 0.5 is above --conf_fg_thres 0.3"),
])
def test_bad_flag_values_stop_before_any_work(tmp_path, capsys, flags, expected):
    work = tmp_path / "work"
    rc = run_sample.main(["--work_dir", str(work), "--device", "cpu", "--make_cam_pass", "true", *flags])
    assert rc == 2
    assert expected in error_line(capsys)
    assert not work.exists()  # not even the config file


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_says_use_cpu(tmp_path, capsys):
    assert run_sample.main(["--work_dir", str(tmp_path / "w"), "--device", "cuda", "--make_cam_pass", "true"]) == 2
    assert "--device cuda: this PyTorch build or machine has no usable CUDA GPU; use --device cpu" in error_line(capsys)
    assert not (tmp_path / "w").exists()


def test_no_step_switched_on_says_so(tmp_path, capsys):
    assert run_sample.main(["--work_dir", str(tmp_path / "w"), "--device", "cpu"]) == 2
    assert "no step is switched on: pass --<step>_pass true" in error_line(capsys)
    assert not (tmp_path / "w").exists()


def test_configs_of_runs_in_the_same_second_are_kept_apart(tmp_path):
    paths = [run_sample.new_config_path(str(tmp_path), "20260101-000000") for _ in range(3)]
    assert [os.path.basename(p) for p in paths] == ["config-20260101-000000.json", "config-20260101-000000-2.json",
                                                    "config-20260101-000000-3.json"]


# ------------------------------------------------------------------------------------------- processes

def children_of(pid):
    """The pids whose parent is `pid` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_sigkill_of_the_main_process_during_a_pooled_make_cam_leaves_no_process(fake_voc, tmp_path):
    make_random_weights(tmp_path / "id.pth")
    cam_dir = tmp_path / "cam"
    argv = make_cam_argv(fake_voc, tmp_path / "id.pth", tmp_path / "work", cam_dir, num_workers=2)
    launcher, marker, log = tmp_path / "launcher.py", tmp_path / "stalled.marker", tmp_path / "run.log"
    launcher.write_text(LAUNCHER)
    env = dict(subprocess_env(), STALL_DIR=str(cam_dir), STALL_AT="3", STALL_MARKER=str(marker))
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(launcher), *argv], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    helpers = []
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, tail(log)
            time.sleep(0.02)
        helpers = children_of(proc.pid)
        assert helpers, "no pool helper was running"
        os.kill(proc.pid, signal.SIGKILL)  # the main process only, as the OOM killer does
        proc.wait(timeout=EXIT_TIMEOUT_S)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in helpers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(p) for p in helpers), f"left running: {[p for p in helpers if alive(p)]}"
    finally:
        for pid in [proc.pid] + helpers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
