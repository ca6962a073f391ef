"""Bad inputs, odd flags and stale outputs: each case exits with a status other than 0, prints one line
that names the flag or file and the fix, and writes or changes no output."""
import os

import pytest
import torch

import run_sample
from misc.torchutils import TrainingDiverged, require_finite

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
