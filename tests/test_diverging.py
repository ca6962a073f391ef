"""A training step whose validation loss, weights or BatchNorm statistics go non-finite stops with one line and
saves nothing, whichever step it is (misc/steptools.py `check_epoch`, `save_trained`)."""
import os
import shutil

import pytest
import torch
from test_irn import WIDTH as IRN_WIDTH
from test_irn import _ir_labels, _randomise, _train_args
from test_train_seg import _args as seg_args
from test_train_seg import _small_blocks
from test_wood_losses import wood_setup  # noqa: F401 (a fixture)

import run_sample
from fakevoc import make_fake_voc
from misc import steptools
from misc.torchutils import TrainingDiverged
from misc.utils import save_torch
from step import train_irn, train_seg, train_wood


def test_train_cam_from_scratch_at_a_huge_learning_rate_stops_as_a_user_sees_it(tmp_path, capsys):
    """The run a new user tried: the training loss stays finite (6.7e13), the validation loss is NaN."""
    voc = make_fake_voc(tmp_path / "VOC2012", n_train=16, n_val=4, size=64, seed=0, n_aug_only=0)
    weights = tmp_path / "w" / "cam.pth"
    rc = run_sample.main(["--preset", "toy", "--pretrained", "none", "--cam_learning_rate", "1e8",
                          "--cam_num_epoches", "1", "--cam_batch_size", "8", "--voc12_root", voc["root"],
                          "--train_list", "train", "--work_dir", str(tmp_path / "w"), "--cam_weights_name",
                          str(weights), "--backbone_width", "8", "--num_workers", "0", "--device", "cpu",
                          "--train_cam_pass", "true"])
    captured = capsys.readouterr()
    assert rc == 2
    assert [line for line in captured.err.splitlines() if line.startswith("error")] == [
        "error: train_cam diverged: the validation loss is nan after epoch 1; nothing was saved. Lower "
        "--cam_learning_rate 1e+08, --cam_weight_decay 0.0001 (or check the images of the lists) and run the step "
        "again"]
    assert "val loss nan" in captured.out and "Traceback" not in captured.err
    assert not weights.exists() and not os.path.exists(str(weights) + ".provenance.json")


@pytest.mark.filterwarnings("ignore:no image of class")
def test_train_wood_with_a_nan_validation_loss_stops(wood_setup, monkeypatch):  # noqa: F811
    args = wood_setup
    args.select_by_gt = False
    monkeypatch.setattr(steptools, "validation_loss", lambda *a: float("nan"))
    with pytest.raises(TrainingDiverged, match=r"^train_wood diverged: the validation loss is nan after epoch 1; "
                                               r"nothing was saved\. Lower --wood_learning_rate"):
        train_wood.run(args)
    assert not os.path.exists(args.wood_weights_name)


def test_train_irn_with_non_finite_statistics_stops(tmp_path, monkeypatch):
    voc = make_fake_voc(tmp_path / "VOC2012", n_train=4, n_val=1, n_aug_only=1, sizes=[(64, 64)], seed=4)
    args = _train_args(tmp_path, voc)
    _ir_labels(voc, voc["train"] + voc["aug_only"], args.ir_label_out_dir)
    from net import resnet50_cam
    save_torch(args.cam_weights_name,
               _randomise(resnet50_cam.Net(pretrained="none", width=IRN_WIDTH, frozen_bn=False), seed=1).state_dict())
    real_check = steptools.check_epoch

    def statistics_blown(step, epoch, suspects, model, val_loss=None):
        # what an overflowing running average leaves in a buffer: the check after the epoch must see it
        next(b for n, b in model.named_buffers() if n.endswith("running_mean")).fill_(float("inf"))
        return real_check(step, epoch, suspects, model, val_loss)
    monkeypatch.setattr(steptools, "check_epoch", statistics_blown)
    with pytest.raises(TrainingDiverged, match=r"^train_irn diverged: 1 weight tensor\(s\) are not finite .* after "
                                               r"epoch 1; nothing was saved"):
        train_irn.run(args)
    assert not os.path.exists(args.irn_weights_name)


def test_train_seg_with_non_finite_weights_at_the_end_stops(tmp_path, monkeypatch):
    root = tmp_path / "seg"
    voc = make_fake_voc(root / "VOC2012", n_train=3, n_val=2, size=40, seed=0)
    shutil.copytree(voc["root"], tmp_path / "VOC2012")
    _small_blocks(monkeypatch)
    args = seg_args(tmp_path, {**voc, "root": str(tmp_path / "VOC2012")})
    real = train_seg.msc_state_dict
    monkeypatch.setattr(train_seg, "msc_state_dict",
                        lambda model: {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                                       for k, v in real(model).items()})
    with pytest.raises(TrainingDiverged, match=r"^train_seg diverged: \d+ weight tensor\(s\) are not finite"):
        train_seg.run(args)
    assert not os.path.exists(args.seg_weights_name)
