"""Torchvision-layout ResNet backbones (docs/method.md §2.1) and their registry, the `--backbone` choices.

A backbone is one entry of BACKBONES: its bottleneck counts per layer and the URL of torchvision's ImageNet
file (downloaded into sess/ under its own name when that file is missing). "resnet50" is the paper's; every
other entry is built and loaded the same way ("v1.5": the stride on the 3x3 conv; no avgpool, no fc;
torchvision's parameter names), so adding one is adding its entry (docs/extending.md, "Add a backbone").

`width` scales every layer (64 = torchvision's network; ToyVOC's ToyNet weights are width 16, see
toy/toynet.py). `frozen_bn=False` gives ordinary BatchNorm, used only for pre-training (toy/toynet.py)
and to train a ToyVOC ID classifier from scratch (`--pretrained none`, see README "Deviations"); every
later step rebuilds the net with frozen BatchNorm and keeps those statistics.
"""
import os
import re
import urllib.error
from collections import namedtuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from misc.torchutils import load_canonical_state
from misc.utils import InputError, load_torch

# title: how messages name it; blocks: bottlenecks of layer1..layer4; imagenet_url: torchvision's file
Backbone = namedtuple("Backbone", "title blocks imagenet_url")
BACKBONES = {
    "resnet50": Backbone("ResNet-50", (3, 4, 6, 3), "https://download.pytorch.org/models/resnet50-19c8e357.pth"),
    "resnet101": Backbone("ResNet-101", (3, 4, 23, 3),
                          "https://download.pytorch.org/models/resnet101-63fe2227.pth"),
}
DEFAULT_BACKBONE = "resnet50"   # the paper's
STRIDES = (2, 2, 2, 1)          # conv1 (the max-pool adds 2), layer2, layer3, layer4: output stride 16
EXPANSION = 4                   # a bottleneck's output channels / its inner channels


def backbone_spec(arch):
    """BACKBONES[arch], or InputError naming the choices."""
    if arch not in BACKBONES:
        raise InputError(f"unknown backbone {arch!r}: --backbone is one of {', '.join(BACKBONES)}")
    return BACKBONES[arch]


def imagenet_file(arch):
    """Where the default ImageNet file of `arch` lives: sess/<the URL's file name>."""
    return os.path.join("sess", os.path.basename(backbone_spec(arch).imagenet_url))


class FixedBatchNorm(nn.BatchNorm2d):
    """BatchNorm that always normalises with its running statistics and never updates them."""

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, eps=self.eps)


class Bottleneck(nn.Module):
    expansion = EXPANSION

    def __init__(self, inplanes, planes, stride, norm, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm(planes)
        self.conv3 = nn.Conv2d(planes, planes * EXPANSION, 1, bias=False)
        self.bn3 = norm(planes * EXPANSION)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _res_layer(norm, inplanes, planes, blocks, stride):
    """`blocks` bottlenecks; the first strides and projects. The projection is built first: module creation
    order is random-init order, kept so that a seeded build gives the weights it always gave."""
    downsample = None
    if stride != 1 or inplanes != planes * EXPANSION:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes * EXPANSION, 1, stride=stride, bias=False),
                                   norm(planes * EXPANSION))
    layers = [Bottleneck(inplanes, planes, stride, norm, downsample)]
    layers += [Bottleneck(planes * EXPANSION, planes, 1, norm) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class ResNet(nn.Module):
    """conv1, bn1, relu, maxpool, layer1..layer4 (no avgpool, no fc): torchvision's parameter names."""

    def __init__(self, blocks, strides=STRIDES, width=64, frozen_bn=True):
        super().__init__()
        norm = FixedBatchNorm if frozen_bn else nn.BatchNorm2d
        self.conv1 = nn.Conv2d(3, width, 7, stride=strides[0], padding=3, bias=False)
        self.bn1 = norm(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = width
        for i, (n_blocks, stride) in enumerate(zip(blocks, (1, *strides[1:])), 1):
            planes = width * 2 ** (i - 1)
            setattr(self, f"layer{i}", _res_layer(norm, inplanes, planes, n_blocks, stride))
            inplanes = planes * EXPANSION
        self.out_channels = inplanes
        for m in self.modules():  # torchvision's initialisation (only matters without ImageNet weights)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


# ------------------------------------------------------------------------------------------ weights

def block_counts(keys, pattern):
    """(bottlenecks of layer1..4) that the state-dict `keys` hold; `pattern` matches a key of a bottleneck with
    groups (layer number 1-4, block index)."""
    counts = [0, 0, 0, 0]
    for m in filter(None, map(pattern.match, keys)):
        layer, block = int(m.group(1)), int(m.group(2))
        counts[layer - 1] = max(counts[layer - 1], block + 1)
    return tuple(counts)


def require_depth(counts, arch, source):
    """InputError when a file's bottleneck counts are those of another registered backbone than `arch` (any
    other mismatch is left to the strict load, which lists the keys)."""
    if counts == backbone_spec(arch).blocks:
        return
    for name, spec in BACKBONES.items():
        if spec.blocks == counts:
            raise InputError(f"{source} holds a {spec.title} (bottlenecks {', '.join(map(str, counts))}), the "
                             f"network is built with --backbone {arch}: pass --backbone {name}, or the weights "
                             f"of a {backbone_spec(arch).title}")


_TORCHVISION_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.")


def _download_url(pretrained, path, arch):
    """The URL to fetch `path` from when it is missing: the given URL, or the registry's for its default file.
    InputError when `pretrained` is the ImageNet file of another backbone (its layers would not fit)."""
    name = os.path.basename(pretrained)
    for other, spec in BACKBONES.items():
        if other != arch and name == os.path.basename(spec.imagenet_url):
            raise InputError(f"--pretrained {pretrained} is torchvision's {spec.title}, the network is built with "
                             f"--backbone {arch}: pass --pretrained {imagenet_file(arch)} (or --backbone {other})")
    if pretrained.startswith(("http://", "https://")):
        return pretrained
    if os.path.abspath(path) == os.path.abspath(imagenet_file(arch)):
        return backbone_spec(arch).imagenet_url
    return None


def imagenet_state_dict(pretrained, arch=DEFAULT_BACKBONE):
    """Torchvision-format ImageNet weights of an `arch` network, without the fc layer.

    `pretrained` is a file path or an http(s) URL. The default file (imagenet_file(arch)) is downloaded from
    torchvision's URL into sess/ when it is missing; offline, the error says which file to put where.
    """
    spec = backbone_spec(arch)
    path = pretrained
    if pretrained.startswith(("http://", "https://")):
        path = os.path.join("sess", os.path.basename(pretrained))
    url = _download_url(pretrained, path, arch)
    if not os.path.isfile(path) and url is not None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, path, progress=True)
        except (urllib.error.URLError, OSError) as e:
            raise InputError(f"cannot download ImageNet weights from {url} ({e}). Download "
                             f"{os.path.basename(url)} by hand and put it at {path}, or pass "
                             f"--pretrained <path> (or --pretrained none for ToyVOC).") from None
    if arch == "resnet50":  # the toy's ToyNet file exists for ResNet-50 only
        what = ("torchvision-format ResNet-50 weights: torchvision's ImageNet file for VOC "
                "(sess/resnet50-19c8e357.pth), or for ToyVOC the ToyNet file that "
                f"`python -m toy.toynet --out {path}` makes (bash_run_sample.sh --toy does it)")
    else:
        what = f"torchvision-format {spec.title} weights: torchvision's ImageNet file ({imagenet_file(arch)})"
    state = load_torch(path, what=what)
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def build_backbone(arch, pretrained="none", strides=STRIDES, width=64, frozen_bn=True):
    """The `arch` network; `pretrained` is 'none' or a path/URL of its torchvision ImageNet weights."""
    spec = backbone_spec(arch)
    model = ResNet(spec.blocks, strides=strides, width=width, frozen_bn=frozen_bn)
    if pretrained and pretrained.lower() != "none":
        state = imagenet_state_dict(pretrained, arch)
        require_depth(block_counts(state, _TORCHVISION_BLOCK), arch, pretrained)
        stem = state.get("conv1.weight")
        if stem is not None and stem.shape != model.conv1.weight.shape:   # say which width to pass
            raise InputError(f"{pretrained} holds a {spec.title} of width {stem.shape[0]}, the network is built "
                             f"with --backbone_width {width}: pass --backbone_width {stem.shape[0]} (64 for "
                             f"torchvision's ImageNet weights)")
        load_canonical_state(model, state, {k: k for k in state}, pretrained, f"a torchvision {spec.title}", width)
    return model
