"""Each flag declared once: its range on its argparse type, and every flag of a step's argument group either
decides the step's outputs (it is among the step's provenance inputs: changing it changes them) or is listed in
run_sample.OUTPUT_NEUTRAL with the reason. A flag added to a group and forgotten in both fails here."""
import argparse
import importlib
import os

import numpy as np
import pytest

import run_sample
from fakevoc import make_fake_voc
from misc import provenance
from misc.utils import InputError, save_json


def steps_of_group(title):
    """The steps an argument group belongs to: its title names them before ':' or '('."""
    names = title.split(":")[0].split("(")[0]
    return [n.strip() for n in names.split("/")]


def group_flags():
    """{step: [flag dests of its argument groups]} for the steps of STEPS."""
    parser, steps = run_sample.build_parser(), dict(run_sample.STEPS)
    flags = {}
    for group in parser._action_groups:
        for step in steps_of_group(group.title or ""):
            if step in steps:
                flags.setdefault(step, []).extend(a.dest for a in group._group_actions)
    return flags


def recorded_steps():
    """(step, its module) of every step that records provenance inputs."""
    found = []
    for name, module in run_sample.STEPS:
        step = importlib.import_module(module)
        if hasattr(step, "provenance_inputs"):
            found.append((name, step))
    return found


def perturbed(value, action):
    """Another value of the flag: what its provenance must notice."""
    if action.choices:
        return next((c for c in action.choices if c != value), "another choice")
    if isinstance(value, bool):
        return not value
    if isinstance(value, list):
        return value + value[-1:]
    if isinstance(value, (int, float)) and value is not None:
        return value * 2 + 1
    return "/nonexistent/other"


@pytest.fixture(scope="module")
def recorded_world(tmp_path_factory):
    """A driver namespace whose every input file exists, so that every step's provenance inputs compute."""
    root = tmp_path_factory.mktemp("flags")
    voc = make_fake_voc(root / "VOC2012", n_train=2, n_val=1, size=32, seed=0)
    files = {}
    for name in ("cam.pth", "wood.pth", "irn.pth", "seg.pth", "ood_list.txt", "candidates.txt", "exclude.txt"):
        files[name] = root / name
        files[name].write_bytes(os.urandom(16))
    folders = {}
    for name in ("cams", "advcams", "ir_label", "pseudo_mask"):
        folders[name] = root / name
        folders[name].mkdir()
        save_json(str(folders[name] / provenance.FOLDER_MANIFEST), {"step": name, "inputs": {"x": name}})
    args = run_sample.parse_args(["--device", "cpu", "--work_dir", str(root / "work"), "--voc12_root", voc["root"],
                                  "--train_list", "train", "--seg_train_list", "train",
                                  "--cam_weights_name", str(files["cam.pth"]),
                                  "--wood_weights_name", str(files["wood.pth"]),
                                  "--irn_weights_name", str(files["irn.pth"]),
                                  "--seg_weights_name", str(files["seg.pth"]),
                                  "--ood_list", str(files["ood_list.txt"]), "--ood_root", str(root),
                                  "--ood_pool_root", str(root), "--ood_pool_list", str(files["candidates.txt"]),
                                  "--mine_exclude", str(files["exclude.txt"]), "--pretrained", str(files["cam.pth"]),
                                  "--seg_init_weights", str(files["cam.pth"]),
                                  "--cam_out_dir", str(folders["cams"]), "--advcam_out_dir", str(folders["advcams"]),
                                  "--ir_label_cam_dir", str(folders["advcams"]),
                                  "--sem_seg_cam_dir", str(folders["advcams"]),
                                  "--ir_label_out_dir", str(folders["ir_label"]),
                                  "--seg_label_dir", str(folders["pseudo_mask"])])
    return args


def _inputs(step, args):
    try:
        return step.provenance_inputs(args)
    except InputError as e:  # a flag that names a required input file: the file decides
        return f"error: {e}"


@pytest.mark.parametrize("name,step", recorded_steps(), ids=[n for n, _ in recorded_steps()])
def test_every_flag_of_a_step_is_recorded_or_declared_output_neutral(recorded_world, name, step):
    actions = {a.dest: a for a in run_sample.build_parser()._actions}
    neutral = run_sample.OUTPUT_NEUTRAL.get(name, {})
    baseline = _inputs(step, recorded_world)
    assert not str(baseline).startswith("error"), baseline
    unrecorded, wrongly_neutral = [], []
    for flag in group_flags()[name]:
        if flag.endswith("_pass"):
            continue
        changed = argparse.Namespace(**vars(recorded_world))
        setattr(changed, flag, perturbed(getattr(recorded_world, flag), actions[flag]))
        decides = _inputs(step, changed) != baseline
        if not decides and flag not in neutral:
            unrecorded.append(flag)
        if decides and flag in neutral:
            wrongly_neutral.append(flag)
    assert not unrecorded, (f"{name}: flags of its argument group that its provenance_inputs ignore: {unrecorded}; "
                            f"record them or add them to run_sample.OUTPUT_NEUTRAL['{name}'] with the reason")
    assert not wrongly_neutral, f"{name}: flags declared output-neutral that change its inputs: {wrongly_neutral}"


def test_the_neutral_declarations_name_real_flags_and_steps():
    dests = {a.dest for a in run_sample.build_parser()._actions}
    steps = dict(run_sample.STEPS)
    for step, flags in run_sample.OUTPUT_NEUTRAL.items():
        assert step in steps
        assert set(flags) <= dests, set(flags) - dests
        assert all(isinstance(why, str) and why for why in flags.values())


@pytest.mark.parametrize("argv,message", [
    (["--cam_batch_size", "0"], "--cam_batch_size 0: must be an integer >= 1"),
    (["--num_workers", "-2"], "--num_workers -2: must be an integer >= 0"),
    (["--ood_coeff", "-1"], "--ood_coeff -1: must be a finite number >= 0"),
    (["--wood_learning_rate", "inf"], "--wood_learning_rate inf: must be a finite number > 0"),
    (["--mine_th", "2"], "--mine_th 2: must be a number in [0, 1]"),
    (["--select_scales", "0.5", "-1"], "--select_scales -1: must be a finite number > 0"),
])
def test_a_flag_out_of_its_range_is_one_line_from_its_declaration(argv, message):
    with pytest.raises(InputError) as error:
        run_sample.parse_args(["--device", "cpu", *argv])
    assert str(error.value) == message


def test_ranges_hold_for_every_preset_default():
    for preset in run_sample.PRESETS:
        args = run_sample.parse_args(["--device", "cpu", "--preset", preset])
        assert args.cam_batch_size >= 1 and 0 <= args.mine_th <= 1 and np.isfinite(args.ood_coeff)
