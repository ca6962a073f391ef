"""DeepLab-v2 (ResNet-101, ASPP, MSC) as kazuto1011/deeplab-pytorch defines it (docs/method.md §8).

The modules and their names follow deeplab-pytorch's `libs/models` (`_ConvBnReLU`, `_Bottleneck`,
`_ResLayer`, `_Stem`, `_ASPP`, `MSC`), so its state dicts load key for key:
`base.layer1.conv1.conv.weight`, `base.layer2.block1.reduce.bn.running_mean`, `base.aspp.c0.weight` ...

- dilated ResNet in the MSRA/caffe layout: the stride sits in the first 1x1 conv ("reduce") of a
  bottleneck; stages strides (1, 2, 1, 1), dilations (1, 1, 2, 4): output stride 8;
- BatchNorm frozen (running statistics always; its affine parameters are not trained);
- `width` scales every layer (64 = the real network), `n_blocks` gives ResNet-101 (3, 4, 23, 3) or,
  for the toy's ToyNet weights, ResNet-50 (3, 4, 6, 3);
- `torchvision_variant=True`: the variant built for torchvision-format ImageNet weights
  (`resnet101-63fe2227.pth`, the toy's ToyNet file), whose bottlenecks have the stride in the 3x3 conv and
  which were trained on torchvision's input (RGB in [0, 1], ImageNet mean / std): a first module `input`
  turns the pipeline's caffe-style input (BGR minus MEAN_BGR) into that, so the weights see the image as
  they were trained to (README "Deviations"). Its buffers mark the variant in the state dict (`input.*`),
  so a trained network reloads as the variant it was built as.

    from net.deeplab_v2 import deeplab_v2
    model = deeplab_v2(n_classes=21, weights="deeplabv2_resnet101_msc-cocostuff164k-100000.pth").eval()
    logits = model(images)          # (B, 21, h, w) at output stride 8 (BGR, mean-subtracted input)
"""
import re
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from misc import dist
from misc.imutils import IMAGENET_MEAN, IMAGENET_STD, resize_label_nearest
from misc.torchutils import bilinear, cross_entropy, load_canonical_state
from misc.utils import InputError, load_torch
from net.resnet50 import FixedBatchNorm

N_CLASSES = 21  # VOC: background + 20 classes
IGNORE = 255
GROUP_LR_MULT = (1, 10, 20)        # backbone convolutions, ASPP weights, ASPP biases
GROUP_DECAYS = (True, True, False)  # ASPP biases have no weight decay
MEAN_BGR = (104.008, 116.669, 122.675)  # deeplab-pytorch's (caffe's) input: BGR minus this, no std division
RESNET101_BLOCKS = (3, 4, 23, 3)
ASPP_RATES = (6, 12, 18, 24)
MSC_SCALES = (0.5, 0.75)
BN_EPS = 1e-5
ASPP_INIT_STD = 0.01
EXPANSION = 4


class _ConvBnReLU(nn.Sequential):
    """conv (no bias) -> frozen BN -> optional ReLU; children named conv / bn / relu as deeplab-pytorch."""

    def __init__(self, in_ch, out_ch, kernel_size, stride, padding, dilation, relu=True):
        super().__init__()
        self.add_module("conv", nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, dilation, bias=False))
        self.add_module("bn", FixedBatchNorm(out_ch, eps=BN_EPS))
        if relu:
            self.add_module("relu", nn.ReLU())


class _Bottleneck(nn.Module):
    """reduce 1x1 -> conv3x3 (dilated) -> increase 1x1, plus the shortcut; relu(h + shortcut)."""

    def __init__(self, in_ch, out_ch, stride, dilation, downsample, stride_in_3x3=False):
        super().__init__()
        mid_ch = out_ch // EXPANSION
        s1, s3 = (1, stride) if stride_in_3x3 else (stride, 1)
        self.reduce = _ConvBnReLU(in_ch, mid_ch, 1, s1, 0, 1, True)
        self.conv3x3 = _ConvBnReLU(mid_ch, mid_ch, 3, s3, dilation, dilation, True)
        self.increase = _ConvBnReLU(mid_ch, out_ch, 1, 1, 0, 1, False)
        self.shortcut = _ConvBnReLU(in_ch, out_ch, 1, stride, 0, 1, False) if downsample else nn.Identity()

    def forward(self, x):
        h = self.increase(self.conv3x3(self.reduce(x)))
        return F.relu(h + self.shortcut(x))


class _ResLayer(nn.Sequential):
    """`n_layers` bottlenecks block1..blockN; the first one strides and has the projection shortcut."""

    def __init__(self, n_layers, in_ch, out_ch, stride, dilation, stride_in_3x3=False):
        super().__init__()
        for i in range(n_layers):
            self.add_module(f"block{i + 1}", _Bottleneck(in_ch if i == 0 else out_ch, out_ch,
                                                         stride if i == 0 else 1, dilation, i == 0,
                                                         stride_in_3x3))


class _Stem(nn.Sequential):
    """7x7/2 conv + BN + ReLU, 3x3/2 max-pool with padding 1 and ceil_mode=True."""

    def __init__(self, out_ch):
        super().__init__()
        self.add_module("conv1", _ConvBnReLU(3, out_ch, 7, 2, 3, 1))
        self.add_module("pool", nn.MaxPool2d(3, 2, 1, ceil_mode=True))


class _ASPP(nn.Module):
    """Four parallel 3x3 convolutions with dilation = padding = rate, with bias, outputs summed."""

    def __init__(self, in_ch, out_ch, rates=ASPP_RATES):
        super().__init__()
        for i, rate in enumerate(rates):
            self.add_module(f"c{i}", nn.Conv2d(in_ch, out_ch, 3, 1, padding=rate, dilation=rate, bias=True))
        self.reset_parameters()

    def reset_parameters(self):
        for m in self.children():
            nn.init.normal_(m.weight, mean=0, std=ASPP_INIT_STD)
            nn.init.constant_(m.bias, 0)

    def forward(self, x):
        return sum(stage(x) for stage in self.children())


class _TorchvisionInput(nn.Module):
    """Caffe-style input (BGR, 0-255, minus MEAN_BGR) -> torchvision's (RGB / 255, minus ImageNet's mean,
    divided by its std): the input that torchvision-format weights were trained on."""

    def __init__(self):
        super().__init__()
        self.register_buffer("bgr_mean", torch.tensor(MEAN_BGR).view(1, 3, 1, 1))
        self.register_buffer("rgb_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("rgb_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x):
        rgb = (x + self.bgr_mean).flip(1) / 255
        return (rgb - self.rgb_mean) / self.rgb_std


class DeepLabV2(nn.Sequential):
    """[input (torchvision variant)], layer1 (stem), layer2..layer5 (dilated ResNet), aspp: logits at
    output stride 8."""

    def __init__(self, n_classes=21, n_blocks=RESNET101_BLOCKS, width=64, torchvision_variant=False):
        super().__init__()
        stride_in_3x3 = torchvision_variant
        if torchvision_variant:
            self.add_module("input", _TorchvisionInput())
        ch = [width * 2 ** p for p in range(6)]  # 64, 128, 256, 512, 1024, 2048 at width 64
        self.add_module("layer1", _Stem(ch[0]))
        self.add_module("layer2", _ResLayer(n_blocks[0], ch[0], ch[2], 1, 1, stride_in_3x3))
        self.add_module("layer3", _ResLayer(n_blocks[1], ch[2], ch[3], 2, 1, stride_in_3x3))
        self.add_module("layer4", _ResLayer(n_blocks[2], ch[3], ch[4], 1, 2, stride_in_3x3))
        self.add_module("layer5", _ResLayer(n_blocks[3], ch[4], ch[5], 1, 4, stride_in_3x3))
        self.add_module("aspp", _ASPP(ch[5], n_classes))
        for m in self.modules():  # frozen BN: its affine parameters are never trained
            if isinstance(m, nn.BatchNorm2d):
                for p in m.parameters():
                    p.requires_grad_(False)


class MSC(nn.Module):
    """Multi-scale inputs: the full input and its bilinear resizes by `scales`.

    Training returns [full, each scale ..., max]: the max is pixel-wise over all logits after resizing the
    smaller ones (bilinear) to the full one's size. Evaluation returns the max only.
    """

    def __init__(self, base, scales=MSC_SCALES):
        super().__init__()
        self.base = base
        self.scales = tuple(scales)

    def forward(self, x):
        logits = self.base(x)
        # bilinear: F.interpolate's, deterministic under --deterministic
        pyramid = [self.base(bilinear(x, scale_factor=s)) for s in self.scales]
        resized = [bilinear(l, size=logits.shape[2:]) for l in pyramid]
        logits_max = torch.max(torch.stack([logits] + resized), dim=0)[0]
        if self.training:
            return [logits] + pyramid + [logits_max]
        return logits_max


# ------------------------------------------------------------------------------------------ weights

_TV_BLOCK = re.compile(r"^layer(\d)\.(\d+)\.(conv|bn)([123])\.(.+)$")
_TV_DOWN = re.compile(r"^layer(\d)\.(\d+)\.downsample\.([01])\.(.+)$")
_DL_BLOCK = re.compile(r"^layer([2-5])\.block(\d+)\.")
_TV_LAYER = re.compile(r"^layer([1-4])\.(\d+)\.")
_TV_UNIT = {"1": "reduce", "2": "conv3x3", "3": "increase"}


def _torchvision_to_deeplab(key):
    """deeplab-pytorch's name of a torchvision ResNet key (None for keys that have no counterpart)."""
    if key.startswith(("conv1.", "bn1.")):
        return "layer1.conv1." + ("conv." if key.startswith("conv1.") else "bn.") + key.split(".", 1)[1]
    m = _TV_BLOCK.match(key)
    if m:
        layer, block, kind, unit, rest = m.groups()
        return f"layer{int(layer) + 1}.block{int(block) + 1}.{_TV_UNIT[unit]}.{kind}.{rest}"
    m = _TV_DOWN.match(key)
    if m:
        layer, block, index, rest = m.groups()
        return f"layer{int(layer) + 1}.block{int(block) + 1}.shortcut.{'conv' if index == '0' else 'bn'}.{rest}"
    return None


def _count_blocks(keys, pattern, layers):
    counts = []
    for layer in layers:
        blocks = {int(m.group(2)) for m in map(pattern.match, keys) if m and int(m.group(1)) == layer}
        counts.append(max(blocks) + (1 if pattern is _TV_LAYER else 0) if blocks else 0)
    return tuple(counts)


def read_weights(path):
    """(state dict in deeplab-pytorch's names without `base.`, layout, n_blocks, origin {our key: file key}).

    Layouts: "deeplab" (deeplab-pytorch's keys, with or without the MSC's `base.` prefix; this project's
    checkpoints too, also the training checkpoints that hold it under "model"), "torchvision" (a torchvision
    ResNet: conv1, bn1, layer1.0.conv1 ...). `fc.*` keys of ImageNet files are dropped.
    """
    state = load_torch(path, what="DeepLab-v2 weights: deeplab-pytorch's state dict, a torchvision ResNet "
                                  "(e.g. resnet101-63fe2227.pth) or a checkpoint of train_seg")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path} is not a state dict of tensors; expected DeepLab-v2 or ResNet weights")
    keys = [k for k in state if not k.startswith("fc.")]
    if any(k.startswith(("layer1.conv1.", "base.layer1.conv1.")) for k in keys):
        origin = {(k[len("base."):] if k.startswith("base.") else k): k for k in keys}
        merged = {ours: state[k] for ours, k in origin.items()}
        # a network built on torchvision weights carries its input module's buffers (DeepLabV2)
        layout = "torchvision" if any(k.startswith("input.") for k in merged) else "deeplab"
        return merged, layout, _count_blocks(list(merged), _DL_BLOCK, (2, 3, 4, 5)), origin
    if "conv1.weight" in keys:
        origin = {}
        for k in keys:
            ours = _torchvision_to_deeplab(k)
            origin[ours if ours is not None else k] = k
        merged = {ours: state[k] for ours, k in origin.items()}
        return merged, "torchvision", _count_blocks(keys, _TV_LAYER, (1, 2, 3, 4)), origin
    raise InputError(f"{path}: neither deeplab-pytorch's layout (layer1.conv1.conv.weight, optionally under "
                     f"base.) nor a torchvision ResNet (conv1.weight); first keys: {', '.join(list(state)[:5])}")


def _width_of(merged, path):
    stem = merged.get("layer1.conv1.conv.weight")
    if stem is None:
        raise InputError(f"{path} has no stem convolution (layer1.conv1.conv.weight / conv1.weight)")
    return stem.shape[0]


def deeplab_v2(n_classes=21, weights=None, width=64, n_blocks=RESNET101_BLOCKS, log=print):
    """The MSC-wrapped DeepLab-v2 with `weights` (path or None) loaded strictly.

    With a file, its layout decides the variant (stride in the 3x3 conv for torchvision files) and its
    block counts the depth; `width` must match the file (InputError otherwise). A file without `aspp.*`
    (ImageNet-only initialisation) gets the head initialised normal(0, 0.01), bias 0, and `log` says so.
    """
    if weights is None:
        return MSC(DeepLabV2(n_classes, n_blocks, width))
    merged, layout, n_blocks, origin = read_weights(weights)
    file_width = _width_of(merged, weights)
    if file_width != width:
        raise InputError(f"{weights} holds a network of width {file_width}, built with width {width}: pass "
                         f"width {file_width} (--seg_width)")
    if any(n == 0 for n in n_blocks):
        raise InputError(f"{weights}: no blocks found for some stage (blocks per stage {n_blocks})")
    base = DeepLabV2(n_classes, n_blocks, width, torchvision_variant=(layout == "torchvision"))
    if layout == "torchvision":  # a torchvision file itself has no input.* buffers: they come from the code
        for key, value in base.input.state_dict().items():
            merged.setdefault("input." + key, value)
            origin.setdefault("input." + key, "input." + key)
    if not any(k.startswith("aspp.") for k in merged):
        fresh = base.aspp.state_dict()
        merged.update({"aspp." + k: v for k, v in fresh.items()})
        origin.update({"aspp." + k: "aspp." + k for k in fresh})
        log(f"deeplab_v2: {weights} has no ASPP head ({layout} layout, ImageNet-only weights): head initialised "
            f"normal(0, {ASPP_INIT_STD}), bias 0")
    load_canonical_state(base, merged, origin, weights, f"a DeepLab-v2 ({layout} layout, blocks {n_blocks})",
                         width)
    log(f"deeplab_v2: loaded {weights} ({layout} layout, blocks {n_blocks}, width {width}"
        f"{', stride in the 3x3 conv, torchvision input' if layout == 'torchvision' else ''})")
    return MSC(base)


def msc_state_dict(model):
    """The MSC model's state dict on the CPU (keys `base.*`: deeplab-pytorch's layout)."""
    return OrderedDict((k, v.detach().cpu()) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------- the training recipe

def resize_labels(labels, size):
    """(B, H, W) int labels -> (B, h, w) int64, PIL nearest per map (deeplab-pytorch's resize_labels; it
    passes (H, W) where PIL expects (width, height), which only matters for non-square crops)."""
    return torch.from_numpy(np.stack([resize_label_nearest(l.numpy(), size) for l in labels.cpu()])
                            .astype(np.int64))


def msc_loss(outputs, labels, iter_size):
    """Sum over the MSC outputs of CE(ignore 255) against the labels resized to each output, / iter_size.

    Under torchrun `labels` are this rank's images of the sub-batch: each CE is then this rank's pixels'
    sum over the sub-batch's labelled pixel count (all ranks'), and the ranks' losses add up to the loss of
    the whole sub-batch (misc/dist.py)."""
    total = 0
    for logit in outputs:
        target = resize_labels(labels, logit.shape[2:]).to(logit.device)
        if dist.world() == 1:
            total = total + cross_entropy(logit, target, IGNORE)
        else:
            labelled = dist.total((target != IGNORE).sum())
            total = total + cross_entropy(logit, target, IGNORE, reduction="sum") / labelled
    return total / iter_size


def param_groups(model, lr, weight_decay):
    """deeplab-pytorch's get_params: backbone conv weights (lr), ASPP weights (10 lr), ASPP biases (20 lr,
    no weight decay). BatchNorm parameters are in no group (frozen)."""
    backbone, aspp_w, aspp_b = [], [], []
    for name, module in model.base.named_modules():
        if not isinstance(module, torch.nn.Conv2d):
            continue
        if name.startswith("aspp"):
            aspp_w.append(module.weight)
            aspp_b.append(module.bias)
        else:
            backbone += list(module.parameters())
    return [{"params": params, "lr": mult * lr, "weight_decay": weight_decay if decays else 0.0}
            for params, mult, decays in zip((backbone, aspp_w, aspp_b), GROUP_LR_MULT, GROUP_DECAYS)]


def poly_lr(base_lr, update, iter_max, power, step_size):
    """The lr in effect after `update` updates (1-based count) under deeplab-pytorch's PolynomialLR,
    stepped once after every update: base * (1 - t/iter_max) ** power set at the last t <= update with
    t % step_size == 0 and t <= iter_max; base before the first such t."""
    t = min(update, iter_max) // step_size * step_size
    return base_lr if t == 0 else base_lr * (1 - t / iter_max) ** power


def set_lrs(optimizer, base_lrs, update, iter_max, power, step_size):
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["lr"] = poly_lr(base, update, iter_max, power, step_size)
