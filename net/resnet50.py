"""ResNet-50 backbone (SPEC 2.1): torchvision layout ("v1.5"), frozen BatchNorm, strides (2, 2, 2, 1).

`width` scales every layer (64 = the real ResNet-50; ToyVOC's ToyNet weights are width 16, see
toy/toynet.py). `frozen_bn=False` gives ordinary BatchNorm, used only for pre-training (toy/toynet.py)
and to train a ToyVOC ID classifier from scratch (`--pretrained none`, see README "Deviations"); every
later step rebuilds the net with frozen BatchNorm and keeps those statistics.
"""
import os
import urllib.error

import torch
import torch.nn as nn
import torch.nn.functional as F

from misc.torchutils import load_canonical_state
from misc.utils import InputError, load_torch

IMAGENET_URL = "https://download.pytorch.org/models/resnet50-19c8e357.pth"
IMAGENET_FILE = os.path.join("sess", "resnet50-19c8e357.pth")


class FixedBatchNorm(nn.BatchNorm2d):
    """BatchNorm that always normalises with its running statistics and never updates them."""

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, eps=self.eps)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride, norm, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = norm(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """conv1, bn1, relu, maxpool, layer1..layer4 (no avgpool, no fc): torchvision's parameter names."""

    def __init__(self, strides=(2, 2, 2, 1), width=64, frozen_bn=True):
        super().__init__()
        norm = FixedBatchNorm if frozen_bn else nn.BatchNorm2d
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, stride=strides[0], padding=3, bias=False)
        self.bn1 = norm(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(norm, width, 3, stride=1)
        self.layer2 = self._make_layer(norm, width * 2, 4, stride=strides[1])
        self.layer3 = self._make_layer(norm, width * 4, 6, stride=strides[2])
        self.layer4 = self._make_layer(norm, width * 8, 3, stride=strides[3])
        self.out_channels = width * 8 * Bottleneck.expansion
        for m in self.modules():  # torchvision's initialisation (only matters without ImageNet weights)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, norm, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
                                       norm(planes * 4))
        layers = [Bottleneck(self.inplanes, planes, stride, norm, downsample)]
        self.inplanes = planes * 4
        layers += [Bottleneck(self.inplanes, planes, 1, norm) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def imagenet_state_dict(pretrained):
    """Torchvision-format ImageNet weights without the fc layer.

    `pretrained` is a file path or an http(s) URL. The default file is downloaded from torchvision's
    URL into sess/ when it is missing; offline, the error says which file to put where.
    """
    path = pretrained
    if pretrained.startswith(("http://", "https://")):
        path = os.path.join("sess", os.path.basename(pretrained))
        url = pretrained
    elif os.path.abspath(pretrained) == os.path.abspath(IMAGENET_FILE):
        url = IMAGENET_URL
    else:
        url = None
    if not os.path.isfile(path) and url is not None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, path, progress=True)
        except (urllib.error.URLError, OSError) as e:
            raise InputError(f"cannot download ImageNet weights from {url} ({e}). Download "
                             f"resnet50-19c8e357.pth by hand and put it at {path}, or pass "
                             f"--pretrained <path> (or --pretrained none for ToyVOC).") from None
    state = load_torch(path, what="torchvision-format ResNet-50 weights: torchvision's ImageNet file for "
                                  "VOC (sess/resnet50-19c8e357.pth), or for ToyVOC the ToyNet file that "
                                  f"`python -m toy.toynet --out {path}` makes (bash_run_sample.sh --toy does it)")
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def resnet50(pretrained="none", strides=(2, 2, 2, 1), width=64, frozen_bn=True):
    """Build the backbone; `pretrained` is 'none' or a path/URL of torchvision ImageNet weights."""
    model = ResNet50(strides=strides, width=width, frozen_bn=frozen_bn)
    if pretrained and pretrained.lower() != "none":
        state = imagenet_state_dict(pretrained)
        stem = state.get("conv1.weight")
        if stem is not None and stem.shape != model.conv1.weight.shape:   # say which width to pass
            raise InputError(f"{pretrained} holds a ResNet-50 of width {stem.shape[0]}, the network is built "
                             f"with --backbone_width {width}: pass --backbone_width {stem.shape[0]} (64 for "
                             f"torchvision's ImageNet weights)")
        load_canonical_state(model, state, {k: k for k in state}, pretrained, "a torchvision ResNet-50", width)
    return model
