"""ToyNet pre-training (toy/toynet.py): scenes with independent object and stuff, labels, the saved file
and its record, and the shipped file of the default flags."""
import json
import os

import numpy as np
import pytest
import torch

import run_sample
from misc import provenance
from misc.utils import InputError
from net.resnet50 import resnet50
from toy import toynet, toyvoc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_scenes_are_deterministic_and_labelled_with_object_and_stuff():
    rgb, label = toynet.draw_toynet_image(0, 3, 64, 64)
    again, label_again = toynet.draw_toynet_image(0, 3, 64, 64)
    assert rgb.dtype == np.uint8 and max(rgb.shape[:2]) == 64 and np.array_equal(rgb, again)
    assert np.array_equal(label, label_again)
    n_obj = len(toyvoc.TOY_CLASSES)
    own_cue, with_object = 0, 0
    for index in range(60):
        _, label = toynet.draw_toynet_image(1, index, 48, 48)
        objects, stuff = np.nonzero(label[:n_obj])[0], np.nonzero(label[n_obj:])[0]
        assert len(objects) <= 1 and 1 <= len(stuff) <= 2 and set(np.unique(label)) <= {0, 1}
        if len(objects):
            with_object += 1
            cls = toyvoc.TOY_CLASSES[objects[0]]
            own_cue += int(cls in toyvoc.CUE_OF and
                           toynet.STUFF_KINDS.index(toyvoc.CUE_OF[cls]) in stuff)
    # unlike ToyVOC (a cue with its class ~92 % of the time), object and stuff are independent
    assert with_object > 40 and own_cue / with_object < 0.5


def test_pretraining_writes_torchvision_weights_that_load_at_their_width(tmp_path, capsys):
    out = str(tmp_path / "toynet.pth")
    argv = ["--out", out, "--width", "4", "--n_images", "8", "--n_check", "2", "--steps", "2",
            "--batch_size", "4", "--crop_size", "32", "--long_min", "48", "--long_max", "48",
            "--resize_long", "40", "56", "--num_workers", "0"]
    toynet.main(argv)
    state = torch.load(out, weights_only=True)
    assert state["fc.weight"].shape == (len(toynet.LABELS), 4 * 8 * 4) and state["conv1.weight"].shape[0] == 4
    backbone = resnet50(out, width=4)
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert state["bn1.running_var"].ne(1).any()   # batch statistics were learnt, as ImageNet's are
    record = json.load(open(out + provenance.FILE_MANIFEST_SUFFIX))
    assert record["step"] == "toynet" and record["inputs"]["steps"] == 2 and record["inputs"]["width"] == 4
    assert record["inputs"]["scenes"] == toynet.scene_digest(toynet.parse_args(argv))
    assert 0 <= record["held_out_label_accuracy"] <= 1
    toynet.main(argv)
    assert "exists; keeping it (made by these inputs)" in capsys.readouterr().out
    # other flags or other scenes: refused, named, the file left as it was
    with pytest.raises(InputError, match=r"steps: 2 -> 3"):
        toynet.main(argv + ["--steps", "3"])
    with pytest.raises(InputError, match=r"scenes: sha256:\w+ -> sha256:\w+"):
        toynet.main(argv + ["--long_min", "40"])
    assert all(torch.equal(v, state[k]) for k, v in torch.load(out, weights_only=True).items())


def test_the_shipped_toynet_file_is_the_one_the_default_flags_make():
    """sess/toy/resnet50_toynet_w16.pth (the toy preset's --pretrained) ships with the project: its record must
    match toy/toynet.py's defaults and painters, so a change to either fails here, not silently in a toy run
    (make it again: python -m toy.toynet --overwrite, 12.5 minutes on 2 cores)."""
    toy = run_sample.parse_args(["--preset", "toy"])
    shipped = os.path.join(ROOT, toy.pretrained)
    defaults = toynet.parse_args(["--out", shipped, "--width", str(toy.backbone_width)])
    assert provenance.file_up_to_date(shipped, "toynet", toynet.provenance_inputs(defaults), defaults,
                                      "--out") == "made by these inputs"
    backbone = resnet50(shipped, width=toy.backbone_width)   # loads strictly at the preset's width
    assert backbone.conv1.weight.shape[0] == toy.backbone_width
    record = json.load(open(shipped + provenance.FILE_MANIFEST_SUFFIX))
    assert record["held_out_label_accuracy"] > 0.9
