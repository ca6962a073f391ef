"""net/resnet50.py: torchvision layout and names, output stride 16, frozen BatchNorm, weight loading."""
import pytest
import torch

from misc.utils import InputError, save_torch
from net.resnet50 import FixedBatchNorm, resnet50


def test_layout_stride_and_torchvision_names():
    net = resnet50("none", width=8).eval()
    names = set(net.state_dict())
    for key in ["conv1.weight", "bn1.running_mean", "layer1.0.downsample.0.weight", "layer4.2.conv3.weight",
                "layer3.5.bn2.num_batches_tracked"]:
        assert key in names
    assert [len(getattr(net, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    # v1.5: the stride sits on the 3x3 convolution
    assert net.layer2[0].conv2.stride == (2, 2) and net.layer2[0].conv1.stride == (1, 1)
    assert net.layer4[0].conv2.stride == (1, 1)
    out = net(torch.randn(1, 3, 64, 96))
    assert out.shape == (1, 8 * 8 * 4, 4, 6) and net.out_channels == 256
    assert resnet50("none").out_channels == 2048


def test_frozen_batchnorm_never_uses_or_updates_batch_statistics():
    net = resnet50("none", width=8, frozen_bn=True).train()
    assert all(isinstance(m, FixedBatchNorm) for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    y_train = net(x)
    y_eval = net.eval()(x)
    assert torch.equal(y_train, y_eval)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    ordinary = resnet50("none", width=8, frozen_bn=False).train()
    ordinary(x)
    assert ordinary.bn1.num_batches_tracked.item() == 1


def test_imagenet_weights_load_and_bad_files_are_named(tmp_path):
    source = resnet50("none")
    state = dict(source.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    path = str(tmp_path / "r50.pth")
    save_torch(path, state)
    loaded = resnet50(path)
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    with pytest.raises(InputError, match="width 64.*--backbone_width 64"):
        resnet50(path, width=16)
    del state["layer4.2.conv3.weight"]
    save_torch(path, state)
    with pytest.raises(InputError, match="layer4.2.conv3.weight"):
        resnet50(path)
    narrow = resnet50("none", width=8)   # a ToyNet-style file of another width loads at that width
    save_torch(path, {**narrow.state_dict(), "fc.weight": torch.zeros(16, 256), "fc.bias": torch.zeros(16)})
    assert all(torch.equal(resnet50(path, width=8).state_dict()[k], v) for k, v in narrow.state_dict().items())
    with pytest.raises(InputError, match="missing file"):
        resnet50(str(tmp_path / "absent.pth"))
