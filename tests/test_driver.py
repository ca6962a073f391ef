"""The driver: presets, flag precedence, strict booleans, derived paths, config/log files, step switches."""
import argparse
import json
import os
import random

import numpy as np
import pytest
import torch

import run_sample
from misc.utils import str2bool


@pytest.mark.parametrize("text,value", [("true", True), ("False", False), ("1", True), ("0", False),
                                        ("yes", True), ("NO", False)])
def test_str2bool_accepts(text, value):
    assert str2bool(text) is value


@pytest.mark.parametrize("text", ["", "maybe", "2", "t", "none"])
def test_str2bool_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        str2bool(text)


def test_bad_boolean_is_one_line(capsys):
    assert run_sample.main(["--train_cam_pass", "False-ish"]) == 2
    assert capsys.readouterr().err == "error: --train_cam_pass expected true/false/1/0/yes/no, got 'False-ish'\n"


def test_paper_preset_is_the_spec():
    a = run_sample.parse_args([])
    assert (a.cam_batch_size, a.cam_num_epoches, a.cam_learning_rate, a.cam_crop_size) == (16, 5, 0.1, 512)
    assert a.cam_scales == [1.0, 0.5, 1.5, 2.0]
    assert a.cam_eval_thres == [0.08, 0.09, 0.10, 0.11, 0.12, 0.13, 0.14]
    assert (a.cluster_K, a.distance_lambda, a.ood_dist_topk, a.ood_coeff) == (50, 0.007, 0.2, 0.25)
    assert (a.adv_iter, a.AD_coeff, a.AD_stepsize, a.score_th) == (27, 7.0, 0.08, 0.5)
    assert (a.conf_fg_thres, a.conf_bg_thres, a.beta, a.exp_times) == (0.30, 0.15, 10, 8)
    assert (a.sem_seg_bg_thres, a.np_power, a.irn_batch_size, a.irn_num_epoches) == (0.22, 1.5, 32, 3)
    assert a.pretrained == os.path.join("sess", "resnet50-19c8e357.pth") and a.backbone_width == 64
    assert a.real_momentum is None and a.select_by_gt is True
    assert a.select_accumulate is True and a.select_before_update is True  # docs/method.md §4.3 (a), (b)


def test_paper_preset_finds_the_release_layout():
    """The W-OoD README's steps 1-3: VOC under Data/, the OoD zip into WOoD_dataset/openimages, the
    released ID classifier (saved as cam_weights_name + '.pth' by the release) into sess/."""
    a = run_sample.parse_args([])
    assert a.voc12_root == "Data/VOC2012"
    assert a.ood_root == "WOoD_dataset/openimages/OoD_images"
    assert a.ood_list == "WOoD_dataset/openimages/ood_list.txt"
    assert a.cam_weights_name == "sess/res50_cam_orig.pth.pth"
    assert not any(getattr(a, f"{name}_pass") for name, _ in run_sample.STEPS)


def test_toy_preset_keeps_the_method_constants_but_the_ood_weight_and_its_lr_and_command_line_wins():
    a = run_sample.parse_args(["--preset", "toy", "--cluster_K", "5", "--work_dir", "/tmp/w"])
    paper = run_sample.parse_args([])
    assert a.pretrained == os.path.join("sess", "toy", "resnet50_toynet_w16.pth") and a.backbone_width == 16
    assert a.voc12_root == "Data/ToyVOC" and a.cluster_K == 5
    assert a.ood_coeff == 8.0 and paper.ood_coeff == 0.25   # the one method weight the toy changes,
    assert a.wood_learning_rate == 0.025 and paper.wood_learning_rate == 0.1   # and the lr it trains stably at
    for name in ["distance_lambda", "ood_dist_topk", "ood_adv_step", "AD_coeff", "AD_stepsize",
                 "score_th", "beta", "exp_times", "conf_fg_thres", "conf_bg_thres", "cam_learning_rate",
                 "irn_learning_rate"]:
        assert getattr(a, name) == getattr(paper, name), name
    assert a.cam_out_dir == "/tmp/w/wood_cam" and a.eval_cam_dir == a.cam_out_dir
    assert a.ir_label_cam_dir == "/tmp/w/wood_advcam" == a.sem_seg_cam_dir
    assert a.ood_list == "/tmp/w/ood_list.txt"


def test_every_step_has_a_switch():
    a = run_sample.parse_args(["--eval_sem_seg_pass", "yes"])
    assert a.eval_sem_seg_pass is True
    names = [n for n, _ in run_sample.STEPS]
    for step in ["train_cam", "mine_ood", "train_wood", "make_cam", "eval_cam", "make_advcam",
                 "cam_to_ir_label", "train_irn", "make_sem_seg", "eval_sem_seg", "make_ins_seg", "eval_ins_seg"]:
        assert step in names
    # the instance steps follow the random walk (they read its CAM folder and IRN)
    assert names.index("eval_sem_seg") < names.index("make_ins_seg") < names.index("eval_ins_seg")
    assert run_sample.parse_args(["--work_dir", "/tmp/w"]).ins_seg_out_dir == "/tmp/w/ins_seg"


def test_run_writes_config_and_log(tmp_path, monkeypatch):
    calls = []

    class FakeStep:
        @staticmethod
        def run(args):
            calls.append(args.eval_cam_dir)
            print("fake step ran")

    monkeypatch.setattr(run_sample.importlib, "import_module", lambda name: FakeStep)
    work = tmp_path / "w"
    rc = run_sample.main(["--preset", "toy", "--work_dir", str(work), "--device", "cpu",
                          "--eval_cam_pass", "true", "--eval_advcam_pass", "true"])
    assert rc == 0
    # eval_advcam scores the AdvCAM folder with the eval_cam machinery
    assert calls == [str(work / "wood_cam"), str(work / "wood_advcam")]
    configs = list(work.glob("config-*.json"))
    assert len(configs) == 1
    config = json.loads(configs[0].read_text())
    assert config["preset"] == "toy" and config["eval_cam_pass"] is True
    log = (work / "run.log").read_text()
    assert "fake step ran" in log and "== step eval_advcam done" in log


def test_each_step_starts_from_the_seed_whatever_ran_before_it(tmp_path, monkeypatch):
    """train_wood after mine_ood in one call draws what it draws alone (a resume skips mine_ood)."""
    draws = {}

    class DrawingStep:
        @staticmethod
        def run(args):
            draws.setdefault(args.work_dir, []).append(
                (torch.rand(3).tolist(), float(np.random.rand()), random.random()))

    monkeypatch.setattr(run_sample.importlib, "import_module", lambda name: DrawingStep)
    alone, after = str(tmp_path / "alone"), str(tmp_path / "after")
    flags = ["--preset", "toy", "--device", "cpu", "--seed", "3", "--train_wood_pass", "true"]
    assert run_sample.main(flags + ["--work_dir", alone]) == 0
    assert run_sample.main(flags + ["--work_dir", after, "--mine_ood_pass", "true"]) == 0
    assert len(draws[after]) == 2 and draws[after][1] == draws[alone][0]
    assert draws[after][0] == draws[alone][0]  # both from seed 3, not a stream carried across steps


def test_unimplemented_or_failing_step_is_a_clean_error(tmp_path, monkeypatch, capsys):
    from misc.utils import InputError

    class FailingStep:
        @staticmethod
        def run(args):
            raise InputError("missing folder X: expected Y there")

    monkeypatch.setattr(run_sample.importlib, "import_module", lambda name: FailingStep)
    rc = run_sample.main(["--work_dir", str(tmp_path), "--device", "cpu", "--train_cam_pass", "true"])
    assert rc == 2
    assert "error: missing folder X: expected Y there" in capsys.readouterr().err
