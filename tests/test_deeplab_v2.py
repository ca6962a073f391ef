"""DeepLab-v2 (docs/method.md §8): layouts that load, MSC outputs, a wrong file's message."""
import pytest
import torch
import torch.nn.functional as F

from misc.imutils import IMAGENET_MEAN, IMAGENET_STD
from misc.utils import InputError
from net.deeplab_v2 import MEAN_BGR, MSC, DeepLabV2, deeplab_v2, msc_state_dict, read_weights
from net.resnet50 import ResNet50

WIDTH = 4
BLOCKS = (1, 2, 2, 1)


def _deeplab_state(prefix="", with_aspp=True, seed=0):
    torch.manual_seed(seed)
    net = DeepLabV2(21, BLOCKS, WIDTH)
    for p in net.parameters():  # distinct values so a mis-mapped key shows
        p.data.normal_()
    state = {prefix + k: v for k, v in net.state_dict().items() if with_aspp or not k.startswith("aspp.")}
    return net, state


def test_deeplab_pytorch_layout_has_its_key_names_and_count():
    keys = MSC(DeepLabV2(21, (3, 4, 23, 3), 64)).state_dict().keys()
    assert len(keys) == 632  # docs/method.md §8: DeepLabV2_ResNet101_MSC
    for k in ["base.layer1.conv1.conv.weight", "base.layer1.conv1.bn.running_mean",
              "base.layer2.block1.reduce.conv.weight", "base.layer2.block1.conv3x3.bn.weight",
              "base.layer2.block1.increase.conv.weight", "base.layer2.block1.shortcut.conv.weight",
              "base.layer5.block3.increase.bn.running_var", "base.aspp.c3.bias"]:
        assert k in keys


@pytest.mark.parametrize("prefix", ["", "base."])
def test_deeplab_layout_loads_with_and_without_base_prefix(tmp_path, prefix):
    net, state = _deeplab_state(prefix)
    torch.save(state, tmp_path / "w.pth")
    model = deeplab_v2(21, str(tmp_path / "w.pth"), width=WIDTH, log=lambda m: None)
    for k, v in net.state_dict().items():
        assert torch.equal(model.base.state_dict()[k], v), k
    x = torch.randn(1, 3, 41, 41)
    with torch.no_grad():
        assert torch.equal(model.eval().base(x), net.eval()(x))


def test_imagenet_only_file_gets_a_fresh_head_and_says_so(tmp_path):
    _, state = _deeplab_state(with_aspp=False)
    state["fc.weight"] = torch.zeros(1000, WIDTH * 32)
    torch.save(state, tmp_path / "init.pth")
    said = []
    model = deeplab_v2(21, str(tmp_path / "init.pth"), width=WIDTH, log=said.append)
    assert any("no ASPP head" in m for m in said)
    for conv in model.base.aspp.children():
        assert torch.equal(conv.bias, torch.zeros(21))
        assert 0.005 < conv.weight.std().item() < 0.015


def test_torchvision_layout_loads_with_the_stride_in_the_3x3_conv(tmp_path):
    torch.manual_seed(0)
    tv = ResNet50(width=WIDTH)  # torchvision names; its bottleneck count is (3, 4, 6, 3)
    for p in tv.parameters():
        p.data.normal_()
    torch.save({**tv.state_dict(), "fc.weight": torch.zeros(10, WIDTH * 32)}, tmp_path / "tv.pth")
    model = deeplab_v2(21, str(tmp_path / "tv.pth"), width=WIDTH, log=lambda m: None)
    sd = model.base.state_dict()
    assert torch.equal(sd["layer1.conv1.conv.weight"], tv.conv1.weight)
    assert torch.equal(sd["layer3.block2.conv3x3.bn.running_var"], tv.layer2[1].bn2.running_var)
    assert torch.equal(sd["layer4.block1.shortcut.conv.weight"], tv.layer3[0].downsample[0].weight)
    assert len(model.base.layer4) == 6
    assert model.base.layer3.block1.conv3x3.conv.stride == (2, 2)
    assert model.base.layer3.block1.reduce.conv.stride == (1, 1)
    # torchvision's layer1..layer2 features (no dilation yet; 65 px: ceil_mode pools to the same size) of
    # the same image: torchvision's input x, and the pipeline's caffe-style input of that image
    x = torch.randn(1, 3, 65, 65)
    rgb = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    caffe = rgb.flip(1) * 255 - torch.tensor(MEAN_BGR).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model.base.input(caffe), x, atol=1e-5)
        ours = model.base.layer3(model.base.layer2(model.base.layer1(model.base.input(caffe))))
        theirs = tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))
    # (random weights make the features ~1e8: the input's float rounding, relative to their scale)
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()
    # trained on those weights, it reloads as the same variant (its input.* buffers mark it)
    torch.save(msc_state_dict(model), tmp_path / "trained.pth")
    again = deeplab_v2(21, str(tmp_path / "trained.pth"), width=WIDTH, log=lambda m: None).eval()
    assert again.base.layer3.block1.conv3x3.conv.stride == (2, 2) and hasattr(again.base, "input")
    with torch.no_grad():
        assert torch.equal(again(caffe), model.eval()(caffe))


def test_own_checkpoint_round_trip(tmp_path):
    model = deeplab_v2(21, None, width=WIDTH, n_blocks=BLOCKS)
    torch.save({"model": model.state_dict(), "update": 3}, tmp_path / "ckpt.pth")
    again = deeplab_v2(21, str(tmp_path / "ckpt.pth"), width=WIDTH, log=lambda m: None)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v)


def test_wrong_files_fail_with_the_keys_named(tmp_path):
    _, state = _deeplab_state()
    del state["layer3.block2.conv3x3.conv.weight"]
    state["layer2.block1.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(InputError, match=r"missing key\(s\): layer3\.block2\.conv3x3\.conv\.weight.*"
                                         r"unexpected key\(s\): layer2\.block1\.extra\.weight"):
        deeplab_v2(21, str(tmp_path / "bad.pth"), width=WIDTH)
    torch.save({"classifier.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(InputError, match="neither deeplab-pytorch's layout"):
        read_weights(str(tmp_path / "other.pth"))
    torch.save(_deeplab_state()[1], tmp_path / "w4.pth")
    with pytest.raises(InputError, match="width 4, built with width 8"):
        deeplab_v2(21, str(tmp_path / "w4.pth"), width=8)
    (tmp_path / "junk.pth").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="cannot load weights"):
        deeplab_v2(21, str(tmp_path / "junk.pth"), width=WIDTH)


def test_msc_outputs_equal_a_direct_computation():
    torch.manual_seed(1)
    model = deeplab_v2(21, None, width=WIDTH, n_blocks=BLOCKS)
    x = torch.randn(2, 3, 49, 49)
    with torch.no_grad():
        full, half, three_q, fused = model.train()(x)
        base = model.base
        d_full = base(x)
        # deeplab-pytorch resizes by scale_factor (sampling grid 1/s, size floor(49 s)), not to a size
        x_half = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
        x_tq = F.interpolate(x, scale_factor=0.75, mode="bilinear", align_corners=False)
        assert x_half.shape[2:] == (24, 24) and x_tq.shape[2:] == (36, 36)
        d_half, d_tq = base(x_half), base(x_tq)
        up = lambda t: F.interpolate(t, size=d_full.shape[2:], mode="bilinear", align_corners=False)
        d_max = torch.maximum(torch.maximum(d_full, up(d_half)), up(d_tq))
        evaluated = model.eval()(x)
    assert full.shape == (2, 21, 7, 7)  # output stride 8: 49 -> 25 -> 13 (ceil pool) -> 7
    for ours, direct in [(full, d_full), (half, d_half), (three_q, d_tq), (fused, d_max), (evaluated, d_max)]:
        assert ours.shape == direct.shape
        assert torch.allclose(ours, direct, atol=1e-6)


def test_frozen_bn_is_not_trained_and_ignores_batch_statistics():
    model = deeplab_v2(21, None, width=WIDTH, n_blocks=BLOCKS).train()
    bn = model.base.layer2.block1.reduce.bn
    assert not bn.weight.requires_grad and not bn.bias.requires_grad
    before = bn.running_mean.clone()
    model(torch.randn(2, 3, 33, 33) * 5 + 3)
    assert torch.equal(bn.running_mean, before)
