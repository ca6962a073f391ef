"""ToyNet pre-training (toy/toynet.py): scenes with independent object and stuff, labels, the saved file."""
import numpy as np
import torch

from toy import toynet, toyvoc
from net.resnet50 import resnet50


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
    toynet.main(argv)
    assert "exists; keeping it" in capsys.readouterr().out
