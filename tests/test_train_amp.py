"""--train_amp bf16: the training steps' forward passes under bfloat16 autocast, float32 losses and weights.

train_cam on a tiny fake VOC, two epochs of one batch, once in float32 and once with --train_amp bf16 from the
same seed: bf16 changes the weights (the autocast is in effect), stays finite and close to float32 (bf16 has
8 bits of mantissa: the losses agree within 5 %), keeps float32 weights, and is recorded in the weights'
provenance only when it is used (so records written before the flag existed stay valid).
"""
import json

import torch

import run_sample
from misc.utils import load_torch, save_torch
from net.resnet50 import ResNet50
from step import train_cam

WIDTH = 8


def _args(voc, tmp_path, name, *extra):
    return run_sample.parse_args([
        "--preset", "toy", "--voc12_root", voc["root"], "--work_dir", str(tmp_path / name), "--device", "cpu",
        "--num_workers", "0", "--backbone_width", str(WIDTH), "--pretrained", str(tmp_path / "backbone.pth"),
        "--train_list", "train", "--cam_batch_size", "4", "--cam_num_epoches", "2", "--cam_learning_rate", "0.01",
        "--cam_resize_long", "48", "64", "--cam_crop_size", "64", "--cam_weights_name", str(tmp_path / f"{name}.pth"),
        *extra])


def test_train_cam_in_bf16_is_close_to_float32(fake_voc, tmp_path, capsys):
    torch.manual_seed(0)
    save_torch(str(tmp_path / "backbone.pth"), ResNet50(width=WIDTH).state_dict())
    losses = {}
    for name, extra in (("fp32", ()), ("bf16", ("--train_amp", "bf16"))):
        args = _args(fake_voc, tmp_path, name, *extra)
        run_sample.seed_everything(args.seed)
        train_cam.run(args)
        out = capsys.readouterr().out
        losses[name] = [float(line.split("train loss ")[1].split(",")[0]) for line in out.splitlines()
                        if line.startswith("train_cam epoch") and "train loss" in line]
    fp32, bf16 = load_torch(str(tmp_path / "fp32.pth")), load_torch(str(tmp_path / "bf16.pth"))
    assert all(v.dtype == fp32[k].dtype for k, v in bf16.items())
    assert all(torch.isfinite(v).all() for v in bf16.values() if v.is_floating_point())
    assert not torch.equal(fp32["classifier.weight"], bf16["classifier.weight"])
    assert len(losses["fp32"]) == len(losses["bf16"]) == 2
    for a, b in zip(losses["fp32"], losses["bf16"]):
        assert abs(a - b) <= 0.05 * a
    records = {n: json.load(open(tmp_path / f"{n}.pth.provenance.json")) for n in ("fp32", "bf16")}
    assert "train_amp" not in json.dumps(records["fp32"]) and '"train_amp": "bf16"' in json.dumps(records["bf16"])
