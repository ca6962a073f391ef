"""Bad inputs, odd flags and stale outputs: each case exits with a status other than 0, prints
one line that names the flag or file and the fix, and writes or changes no output.

- training guards: a NaN loss (--cam_learning_rate 1e8) stops train_cam, no weights file;
- stale outputs (misc/provenance.py): W-OoD CAMs into a folder of ID CAMs (what `bash_run_sample.sh
  --cam_out_dir X` does), a retrained classifier, changed scales, outputs without or with a corrupt
  record, weights trained with other flags; --overwrite recomputes; the same inputs resume;
- flags (run_sample.validate_args), no step switched on, config names, interrupt wording;
- the pool: a SIGKILL of the main process during a pooled make_cam leaves no helper behind;
- file contents: CAM keys / map count / NaN, GT values, duplicate ids, corrupt summary.json, unreadable
  training images (up front, and inside a loader worker).
"""
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
from test_resume import (
    EXIT_TIMEOUT_S,
    LAUNCHER,
    ROOT,
    START_TIMEOUT_S,
    make_cam_argv,
    make_random_weights,
    subprocess_env,
    tail,
)

import run_sample
from misc.torchutils import TrainingDiverged, require_finite
from misc.utils import load_npz, palette_voc, save_npz, save_png
from voc12.dataloader import load_img_name_list, read_index_png

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
    assert "exists; keeping it (made by these inputs)" in capsys.readouterr().out
    assert run_sample.main(train_cam_argv(fake_voc, tmp_path, "--cam_learning_rate", "0.01")) == 2
    line = error_line(capsys)
    assert f"{weights} was made by other inputs (cam_learning_rate: 0.1 -> 0.01)" in line, line
    assert "--overwrite" in line and "--cam_weights_name" in line, line
    assert os.stat(weights).st_mtime_ns == stamp
    os.remove(str(weights) + ".provenance.json")  # as a released file put there by hand: used as given
    assert run_sample.main(train_cam_argv(fake_voc, tmp_path, "--cam_learning_rate", "0.01")) == 0
    assert "exists; keeping it (no provenance record (cam.pth.provenance.json): not made by this project's " \
           "train_cam, used as given" in capsys.readouterr().out
    assert os.stat(weights).st_mtime_ns == stamp


# ------------------------------------------------------------------------------------ flags and driver

@pytest.mark.parametrize("flags,expected", [
    (["--adv_iter", "0"], "--adv_iter 0: must be an integer >= 1"),
    (["--adv_iter", "-1"], "--adv_iter -1: must be an integer >= 1"),
    (["--cam_scales", "1.0", "0"], "--cam_scales 0: must be a finite number > 0"),
    (["--ood_mask_class", "20"], "--ood_mask_class 20: must be a class index in 0-19"),
    (["--seed", "x"], "--seed invalid int value: 'x'"),
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


# ------------------------------------------------------------------------------------- file contents

def eval_argv(fake_voc, tmp_path, cam_dir):
    return ["--preset", "toy", "--work_dir", str(tmp_path / "work"), "--voc12_root", fake_voc["root"],
            "--device", "cpu", "--eval_cam_dir", str(cam_dir), "--eval_cam_pass", "true"]


@pytest.mark.parametrize("case,expected", [
    ("key_25", "are not distinct class indices 0-19"),
    ("other_class", "but the image's labels are"),
    ("nan", "holds non-finite values (NaN / inf)"),
    ("count", "is not one map per key"),
])
def test_a_cam_file_that_cannot_be_right_stops_eval_cam(fake_voc, tmp_path, id_cams, capsys, case, expected):
    _, cam_dir = id_cams
    img_id = fake_voc["train"][0]
    path = cam_dir / f"{img_id}.npz"
    arrays = load_npz(str(path))
    keys, high_res = arrays["keys"], arrays["high_res"]
    if case == "key_25":
        keys = np.arange(keys.size, dtype=np.int64) + 25  # cam_to_ir_label would have written class 26
    elif case == "other_class":
        keys = (keys + 5) % 20
    elif case == "nan":
        high_res = high_res.copy()
        high_res[0, 0, 0] = np.nan
    else:
        high_res = np.concatenate([high_res, high_res[:1]])
    save_npz(str(path), keys=keys, cam=arrays["cam"], high_res=high_res)
    capsys.readouterr()
    assert run_sample.main(eval_argv(fake_voc, tmp_path, cam_dir)) == 2
    line = error_line(capsys)
    assert str(path) in line and expected in line and "re-run make_cam" in line, line
    assert not (tmp_path / "work" / "summary.json").exists()


def test_a_ground_truth_value_outside_the_classes_names_the_file(fake_voc, tmp_path, id_cams, capsys):
    _, cam_dir = id_cams
    gt_path = os.path.join(fake_voc["root"], "SegmentationClass", fake_voc["train"][1] + ".png")
    gt = read_index_png(gt_path, "gt").copy()
    gt[0, 0] = 30
    save_png(gt_path, gt, palette=palette_voc())
    capsys.readouterr()
    assert run_sample.main(eval_argv(fake_voc, tmp_path, cam_dir)) == 2
    line = error_line(capsys)
    assert f"{gt_path} holds the value(s) [30]: a ground truth has classes 0-20 and 255" in line, line
    assert not (tmp_path / "work" / "summary.json").exists()


def test_a_corrupt_summary_stops_the_evaluation_before_it_runs(fake_voc, tmp_path, id_cams, capsys):
    _, cam_dir = id_cams
    summary = tmp_path / "work" / "summary.json"
    summary.parent.mkdir(exist_ok=True)
    summary.write_text('[{"name": "x"')
    capsys.readouterr()
    assert run_sample.main(eval_argv(fake_voc, tmp_path, cam_dir)) == 2
    out = capsys.readouterr()
    assert f"error: cannot read {summary}" in out.err and "move it away" in out.err, out.err
    assert "best mIoU" not in out.out  # stopped before evaluating
    assert summary.read_text() == '[{"name": "x"'


def test_duplicate_ids_in_a_list_are_used_once_with_a_warning(fake_voc, tmp_path, capsys):
    listed = tmp_path / "list.txt"
    a, b = fake_voc["train"][:2]
    listed.write_text(f"{a}\n{b}\n{a}\n")
    assert load_img_name_list(fake_voc["root"], str(listed)) == [a, b]
    out = capsys.readouterr().out
    assert f"warning: image list {listed} names 1 id(s) more than once (e.g. {a}); each is used once" in out


def test_an_unreadable_training_image_stops_train_cam_before_epoch_1(fake_voc, tmp_path, capsys):
    bad = os.path.join(fake_voc["root"], "JPEGImages", fake_voc["train"][2] + ".jpg")
    with open(bad, "wb") as f:
        f.write(b"not an image at all")
    assert run_sample.main(train_cam_argv(fake_voc, tmp_path, "--num_workers", "1")) == 2
    out = capsys.readouterr()
    assert f"error: {bad} is not a readable image" in out.err and "remove its id from the list" in out.err, out.err
    assert "Traceback" not in out.err and "train_cam epoch" not in out.err + out.out
    assert not (tmp_path / "sess" / "cam.pth").exists()


def test_an_image_that_breaks_in_a_loader_worker_is_one_line(fake_voc, tmp_path, capsys):
    # a valid header, a truncated body: passes the up-front check, fails when a worker decodes it
    bad = os.path.join(fake_voc["root"], "JPEGImages", fake_voc["train"][2] + ".jpg")
    with open(bad, "rb") as f:
        data = f.read()
    with open(bad, "wb") as f:
        f.write(data[:200])
    assert run_sample.main(train_cam_argv(fake_voc, tmp_path, "--num_workers", "1")) == 2
    line = error_line(capsys)
    assert bad in line and "DataLoader worker" not in line and "Traceback" not in line, line
    assert not (tmp_path / "sess" / "cam.pth").exists()


@pytest.mark.parametrize("step,expected", [
    ("train_cam", "interrupted during train_cam: nothing of it was saved, and it restarts from its first epoch"),
    ("make_cam", "interrupted: finished outputs are kept; run the same command again to resume"),
])
def test_interrupt_wording_says_whether_the_step_restarts_or_resumes(tmp_path, monkeypatch, capsys, step, expected):
    class Interrupted:
        @staticmethod
        def run(args):
            raise KeyboardInterrupt

    monkeypatch.setattr(run_sample.importlib, "import_module", lambda name: Interrupted)
    assert run_sample.main(["--work_dir", str(tmp_path), "--device", "cpu", f"--{step}_pass", "true"]) == 130
    assert expected in capsys.readouterr().err
