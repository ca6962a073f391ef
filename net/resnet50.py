"""ResNet-50 (docs/method.md §2.1), the paper's backbone: net/resnet.py's "resnet50" entry under the names the
project imports (ResNet50, resnet50, FixedBatchNorm). Torchvision layout ("v1.5"), frozen BatchNorm,
strides (2, 2, 2, 1); `width` and `frozen_bn` as in net/resnet.py.
"""
from net.resnet import BACKBONES, STRIDES, Bottleneck, FixedBatchNorm, ResNet, build_backbone, imagenet_file
from net.resnet import imagenet_state_dict as _imagenet_state_dict

__all__ = ["Bottleneck", "FixedBatchNorm", "IMAGENET_FILE", "IMAGENET_URL", "ResNet50", "imagenet_state_dict",
           "resnet50"]

IMAGENET_URL = BACKBONES["resnet50"].imagenet_url
IMAGENET_FILE = imagenet_file("resnet50")


class ResNet50(ResNet):
    """conv1, bn1, relu, maxpool, layer1..layer4 with (3, 4, 6, 3) bottlenecks: torchvision's parameter names."""

    def __init__(self, strides=STRIDES, width=64, frozen_bn=True):
        super().__init__(BACKBONES["resnet50"].blocks, strides=strides, width=width, frozen_bn=frozen_bn)


def imagenet_state_dict(pretrained):
    """Torchvision-format ResNet-50 ImageNet weights without the fc layer (net/resnet.py)."""
    return _imagenet_state_dict(pretrained, "resnet50")


def resnet50(pretrained="none", strides=STRIDES, width=64, frozen_bn=True):
    """Build the backbone; `pretrained` is 'none' or a path/URL of torchvision ImageNet weights."""
    return build_backbone("resnet50", pretrained=pretrained, strides=strides, width=width, frozen_bn=frozen_bn)
