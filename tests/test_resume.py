"""Interrupt a run in the middle of a step, run the same command again: it resumes, and no output file
is truncated or corrupt.

The driver runs in a real subprocess (its own process group, so a signal reaches it and its loader worker
as a Ctrl-C from a terminal would) and is interrupted with a real SIGINT or SIGKILL. To interrupt it at the
worst moment, not wherever the machine's speed puts it, the run is started through a small launcher that
executes run_sample.py unchanged but makes one file write into the step's output folder stall halfway:
half of the file's bytes are on disk, a marker file appears, and the process sleeps until it is signalled.
The test polls for the marker (with a timeout, no assumption on speed), then signals the process group.

- make_cam (SIGINT and SIGKILL; in one process and with the toy preset's process pool): two CAM files
  are complete when the third write (of the calling process) stalls. After the interrupt every visible
  .npz loads completely and equals an uninterrupted run; nothing else is visible
  (SIGINT: the temp file is removed; SIGKILL: only a hidden temp file can remain). Re-running the plain
  driver command skips the finished files (same inode and mtime) and completes the rest, equal to the
  uninterrupted run array for array.
- train_cam (SIGINT and SIGKILL while the weights are being written): no weights file exists afterwards,
  so a re-run trains again instead of keeping a truncated file.
"""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import run_sample
from fakevoc import random_bn_statistics
from misc.provenance import FOLDER_MANIFEST
from misc.utils import InputError, load_npz, save_torch
from net.resnet50_cam import CAM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH = 8
STALL_AT = 3            # make_cam: the third write into the output folder stalls; two outputs are complete
START_TIMEOUT_S = 60    # the subprocess imports torch, reads images, runs the net: generous on a loaded machine
EXIT_TIMEOUT_S = 30

LAUNCHER = '''"""Run run_sample.py (as __main__, unchanged); its STALL_AT-th write into STALL_DIR stalls halfway."""
import io
import os
import runpy
import signal
import sys
import time

import numpy as np
import torch

# A job a shell starts in the background (`cmd &`, as CI runners may) inherits SIGINT ignored, and Python
# then installs no KeyboardInterrupt handler; a foreground process, which Ctrl-C reaches, has the default.
signal.signal(signal.SIGINT, signal.default_int_handler)

STALL_DIR = os.path.abspath(os.environ["STALL_DIR"])
STALL_AT = int(os.environ["STALL_AT"])
MARKER = os.environ["STALL_MARKER"]
_count = [0]


def _in_stall_dir(file):
    name = file if isinstance(file, (str, os.PathLike)) else getattr(file, "name", "")
    return os.path.dirname(os.path.abspath(os.fspath(name))) == STALL_DIR


def _stall(file, data):
    f = open(file, "wb") if isinstance(file, (str, os.PathLike)) else file
    f.write(data[: len(data) // 2])
    f.flush()
    os.fsync(f.fileno())
    open(MARKER, "w").close()
    time.sleep(120)  # the test signals the process group here
    raise SystemExit("stalled write: no signal came")


def _hooked(real, file_arg):
    def write(*args, **kwargs):
        file = args[file_arg]
        if _in_stall_dir(file):
            _count[0] += 1
            if _count[0] == STALL_AT:
                buffer = io.BytesIO()
                real(*args[:file_arg], buffer, *args[file_arg + 1:], **kwargs)
                _stall(file, buffer.getvalue())
        return real(*args, **kwargs)
    return write


import misc.utils  # noqa: E402  (the repository root is on PYTHONPATH)
misc.utils.write_npz = _hooked(misc.utils.write_npz, 0)   # save_npz: write_npz(file, arrays)
torch.save = _hooked(torch.save, 1)   # save_torch: torch.save(state_dict, path)

if __name__ == "__main__":
    sys.argv = ["run_sample.py"] + sys.argv[1:]
    runpy.run_path(os.path.join(os.getcwd(), "run_sample.py"), run_name="__main__")
'''


# ------------------------------------------------------------------------------------------ helpers

def subprocess_env():
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")  # one thread: as the in-process reference
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def tail(path, n=3000):
    with open(path, errors="replace") as f:
        return f.read()[-n:]


def run_driver(argv, log):
    """The plain driver command, to completion; returns its output."""
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "run_sample.py", *argv], cwd=ROOT, env=subprocess_env(),
                              stdout=out, stderr=subprocess.STDOUT, timeout=120)
    assert done.returncode == 0, f"re-run failed (rc {done.returncode}):\n{tail(log)}"
    return tail(log)


def interrupt_driver(tmp_path, argv, stall_dir, stall_at, sig):
    """Start the driver through the stalling launcher, wait until its `stall_at`-th write into `stall_dir`
    is half done, send `sig` to its process group and wait for it to end. Returns the log path."""
    launcher = tmp_path / "stalling_launcher.py"
    launcher.write_text(LAUNCHER)
    marker, log = tmp_path / "stalled.marker", tmp_path / "interrupted.log"
    env = dict(subprocess_env(), STALL_DIR=str(stall_dir), STALL_AT=str(stall_at), STALL_MARKER=str(marker))
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(launcher), *argv], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not marker.exists():
            assert proc.poll() is None, \
                f"the run ended (rc {proc.returncode}) before the stalled write:\n{tail(log)}"
            assert time.monotonic() < deadline, f"no stalled write after {START_TIMEOUT_S} s:\n{tail(log)}"
            time.sleep(0.02)
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the run did not stop within {EXIT_TIMEOUT_S} s of {sig.name}:\n{tail(log)}")
        assert proc.returncode != 0, f"the interrupted run reported success:\n{tail(log)}"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group (loader worker)
        except ProcessLookupError:
            pass
        proc.wait()
    return log


def visible_outputs(folder, suffix):
    """Names that a consumer globbing `*<suffix>` would take as outputs (glob skips dot files)."""
    return sorted(n for n in os.listdir(folder) if n.endswith(suffix) and not n.startswith("."))


def assert_only_hidden_leftovers(folder, outputs, sig, log):
    others = sorted(set(os.listdir(folder)) - set(outputs) - {FOLDER_MANIFEST})  # the folder's provenance record
    if sig == signal.SIGINT:
        # the process could clean up: the half-written temp file must be gone
        assert others == [], f"SIGINT left {others} in {folder}:\n{tail(log)}"
    for name in others:  # SIGKILL: a killed process cannot remove its temp file, but it must stay hidden
        assert name.startswith("."), f"leftover {name} in {folder} would be taken for an output"


def make_random_weights(path, seed=0):
    torch.manual_seed(seed)
    model = random_bn_statistics(CAM(width=WIDTH))
    save_torch(str(path), model.state_dict())


def make_cam_argv(fake_voc, weights, work, cam_dir, num_workers=1):
    return ["--preset", "toy", "--work_dir", str(work), "--voc12_root", fake_voc["root"],
            "--infer_list", "train_aug", "--make_cam_from", "id", "--cam_weights_name", str(weights),
            "--backbone_width", str(WIDTH), "--device", "cpu", "--num_workers", str(num_workers),
            "--cam_out_dir", str(cam_dir), "--make_cam_pass", "true"]


# -------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("num_workers", [1, 2], ids=["one_process", "pool"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_make_cam_interrupted_then_resumed(fake_voc, tmp_path, sig, num_workers):
    weights = tmp_path / "cam.pth"
    make_random_weights(weights)
    ids = fake_voc["train"] + fake_voc["aug_only"]  # = train_aug of the fake VOC (6 ids)

    # uninterrupted reference: the same command, in this process (one torch thread, as the subprocesses)
    ref_dir = tmp_path / "ref_cam"
    assert run_sample.main(make_cam_argv(fake_voc, weights, tmp_path / "ref_work", ref_dir)) == 0
    reference = {i: load_npz(str(ref_dir / f"{i}.npz")) for i in ids}
    assert visible_outputs(ref_dir, ".npz") == sorted(f"{i}.npz" for i in ids)

    cam_dir = tmp_path / "cam"
    argv = make_cam_argv(fake_voc, weights, tmp_path / "work", cam_dir, num_workers)
    log = interrupt_driver(tmp_path, argv, cam_dir, STALL_AT, sig)

    # interrupted while writing the third file: exactly the first two are outputs, complete and right.
    # With the pool (--num_workers 2, the toy preset's) the calling process stalls on its third write and
    # its helper may have finished others meanwhile: those must be complete and right as well.
    done = visible_outputs(cam_dir, ".npz")
    if num_workers == 1:
        assert done == sorted(f"{i}.npz" for i in ids[:STALL_AT - 1]), f"{done}\n{tail(log)}"
    else:
        assert STALL_AT - 1 <= len(done) < len(ids), f"{done}\n{tail(log)}"
    for name in done:
        arrays = load_npz(str(cam_dir / name))  # InputError if truncated
        for key, value in reference[name[:-4]].items():
            np.testing.assert_array_equal(arrays[key], value, err_msg=f"{name}: {key}")
    assert_only_hidden_leftovers(cam_dir, done, sig, log)
    for name in set(os.listdir(cam_dir)) - set(done):  # the stalled temp file really is half-written
        with pytest.raises(InputError):
            load_npz(str(cam_dir / name))
    before = {n: (os.stat(cam_dir / n).st_ino, os.stat(cam_dir / n).st_mtime_ns) for n in done}

    # the same command again: finished files are kept as they are, the rest is made
    output = run_driver(argv, tmp_path / "rerun.log")
    assert f"{len(done)} already in" in output, output
    assert visible_outputs(cam_dir, ".npz") == sorted(f"{i}.npz" for i in ids)
    for name, stamp in before.items():
        assert (os.stat(cam_dir / name).st_ino, os.stat(cam_dir / name).st_mtime_ns) == stamp, \
            f"{name} was rewritten by the re-run"
    for i in ids:
        arrays = load_npz(str(cam_dir / f"{i}.npz"))
        assert sorted(arrays) == sorted(reference[i])
        for key, value in reference[i].items():
            np.testing.assert_array_equal(arrays[key], value, err_msg=f"{i}: {key}")
    assert_only_hidden_leftovers(cam_dir, visible_outputs(cam_dir, ".npz"), sig, log)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_train_cam_interrupted_while_saving_leaves_no_weights(fake_voc, tmp_path, sig):
    sess = tmp_path / "sess"
    sess.mkdir()
    weights = sess / "res50_cam.pth"
    argv = ["--preset", "toy", "--work_dir", str(tmp_path / "work"), "--voc12_root", fake_voc["root"],
            "--train_cam_pass", "true", "--cam_weights_name", str(weights), "--backbone_width", str(WIDTH),
            "--pretrained", "none",
            "--device", "cpu", "--num_workers", "0", "--cam_batch_size", "2", "--cam_num_epoches", "1",
            "--cam_crop_size", "64", "--cam_resize_long", "48", "80"]
    log = interrupt_driver(tmp_path, argv, sess, 1, sig)  # the first (only) write there: the weights
    assert "train_cam epoch 1/1" in tail(log), tail(log)  # training had finished: the kill hit the save
    assert not weights.exists(), f"an interrupted save left {weights} ({weights.stat().st_size} bytes)"
    assert visible_outputs(sess, ".pth") == []
    assert_only_hidden_leftovers(sess, [], sig, log)
