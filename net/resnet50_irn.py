"""Inter-pixel relation network (docs/method.md §2.3), IRN's net/resnet50_irn.py.

A frozen, detached ResNet backbone (ResNet-50, the paper's, or another entry of net/resnet.py: `arch`) cut
into x1..x5 feeds two heads of 1x1 convolutions:
the boundary branch (`fc_edge1..6`, one logit map at stride 4) and the displacement branch
(`fc_dp1..7`, a 2-channel map (dy, dx) at stride 4), followed by the mean-shift buffer.

Canonical state-dict names (`resnet50.` prefixes the backbone whatever `arch` is: the released name):
`resnet50.{conv1,bn1,layer1..4}.*`, `fc_edge1..6.*`, `fc_dp1..7.*`,
`mean_shift.running_mean`. The original module also registers the same tensors as `stage1..5.*`,
`backbone.<i>.*`, `edge_layers.<i>.*`, `dp_layers.<i>.*` and `fc_dp7.4.running_mean`, and its
training module adds `path_indices<i>` / `disp_target` buffers: `load_irn_state` maps the aliases
(checking that copies agree) and ignores those buffers, so the released checkpoints load.

`backbone_width` scales x1..x5 (width, 4w, 8w, 16w, 32w channels; 64 = the real network); the
head widths (32, 64, 128, 256) are docs/method.md §2.3's at every width.
"""
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from misc import indexing
from misc.torchutils import Bilinear, load_canonical_state
from misc.utils import InputError, load_torch, require_file
from net.resnet import DEFAULT_BACKBONE, block_counts, build_backbone, require_depth

STRIDES = (2, 2, 2, 1)
FEATURE_STRIDE = 4  # edge / displacement maps are at 1/4 of the input
# lr multipliers of the optimizer groups (boundary, displacement), docs/method.md §2.3
PARAM_GROUP_LR_MULT = (1, 10)


def _head(c_in, c_out, groups, upsample=None):
    """conv 1x1 (no bias), GroupNorm, [bilinear up], ReLU: IRN's layer order (up before the ReLU)."""
    layers = [nn.Conv2d(c_in, c_out, 1, bias=False), nn.GroupNorm(groups, c_out)]
    if upsample:
        layers.append(Bilinear(upsample))  # nn.Upsample's bilinear, deterministic under --deterministic
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class MeanShift(nn.Module):
    """Subtracts a (2,) running mean from the displacement field in eval mode only."""

    def __init__(self, num_features=2):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(num_features))

    def forward(self, x):
        if self.training:
            return x
        return x - self.running_mean.view(1, -1, 1, 1)


class Net(nn.Module):
    """forward(x) -> (edge logits (B, 1, h/4, w/4), displacement (B, 2, h/4, w/4)). `arch`: the backbone
    (net/resnet.py BACKBONES), held as `self.resnet50` whatever it is (the state-dict prefix)."""

    def __init__(self, pretrained="none", backbone_width=64, arch=DEFAULT_BACKBONE):
        super().__init__()
        self.arch = arch
        self.resnet50 = build_backbone(arch, pretrained=pretrained, strides=STRIDES, width=backbone_width,
                                       frozen_bn=True)
        for p in self.resnet50.parameters():  # the backbone is never trained
            p.requires_grad = False
        w = backbone_width
        c1, c2, c3, c4, c5 = w, 4 * w, 8 * w, 16 * w, 32 * w
        self.mean_shift = MeanShift(2)

        # boundary branch
        self.fc_edge1 = _head(c1, 32, 4)
        self.fc_edge2 = _head(c2, 32, 4)
        self.fc_edge3 = _head(c3, 32, 4, upsample=2)
        self.fc_edge4 = _head(c4, 32, 4, upsample=4)
        self.fc_edge5 = _head(c5, 32, 4, upsample=4)
        self.fc_edge6 = nn.Conv2d(160, 1, 1, bias=True)

        # displacement branch
        self.fc_dp1 = _head(c1, 64, 8)
        self.fc_dp2 = _head(c2, 128, 16)
        self.fc_dp3 = _head(c3, 256, 16)
        self.fc_dp4 = _head(c4, 256, 16, upsample=2)
        self.fc_dp5 = _head(c5, 256, 16, upsample=2)
        self.fc_dp6 = _head(768, 256, 16, upsample=2)
        self.fc_dp7 = nn.Sequential(nn.Conv2d(448, 256, 1, bias=False), nn.GroupNorm(16, 256),
                                    nn.ReLU(inplace=True), nn.Conv2d(256, 2, 1, bias=False))

        self.edge_layers = [self.fc_edge1, self.fc_edge2, self.fc_edge3, self.fc_edge4, self.fc_edge5,
                            self.fc_edge6]
        self.dp_layers = [self.fc_dp1, self.fc_dp2, self.fc_dp3, self.fc_dp4, self.fc_dp5, self.fc_dp6,
                          self.fc_dp7]

    def backbone_features(self, x):
        """x1 (stem + max-pool), x2 = layer1, x3 = layer2, x4 = layer3, x5 = layer4, all detached."""
        r = self.resnet50
        x1 = r.maxpool(r.relu(r.bn1(r.conv1(x)))).detach()
        x2 = r.layer1(x1).detach()
        x3 = r.layer2(x2).detach()
        x4 = r.layer3(x3).detach()
        x5 = r.layer4(x4).detach()
        return x1, x2, x3, x4, x5

    def forward(self, x):
        x1, x2, x3, x4, x5 = self.backbone_features(x)

        edge1 = self.fc_edge1(x1)
        edge2 = self.fc_edge2(x2)
        h, w = edge2.shape[2:]
        edge3 = self.fc_edge3(x3)[..., :h, :w]
        edge4 = self.fc_edge4(x4)[..., :h, :w]
        edge5 = self.fc_edge5(x5)[..., :h, :w]
        edge_out = self.fc_edge6(torch.cat([edge1, edge2, edge3, edge4, edge5], dim=1))

        dp1 = self.fc_dp1(x1)
        dp2 = self.fc_dp2(x2)
        dp3 = self.fc_dp3(x3)
        dp4 = self.fc_dp4(x4)[..., :dp3.size(2), :dp3.size(3)]
        dp5 = self.fc_dp5(x5)[..., :dp3.size(2), :dp3.size(3)]
        dp_up3 = self.fc_dp6(torch.cat([dp3, dp4, dp5], dim=1))[..., :dp2.size(2), :dp2.size(3)]
        dp_out = self.mean_shift(self.fc_dp7(torch.cat([dp1, dp2, dp_up3], dim=1)))
        return edge_out, dp_out

    def trainable_parameters(self):
        """(boundary-branch parameters, displacement-branch parameters): lr x1 and x10."""
        return ([p for m in self.edge_layers for p in m.parameters()],
                [p for m in self.dp_layers for p in m.parameters()])

    def train(self, mode=True):
        super().train(mode)
        self.resnet50.eval()  # frozen backbone (its BatchNorm is frozen anyway)
        return self

    def load_backbone_from_classifier(self, weights_path):
        """Copy the backbone of an ID classifier (net/resnet50_cam.py state dict, same `arch`) into ours.

        For `--pretrained none` (ToyVOC): there are no ImageNet weights, and a random backbone
        gives IRN nothing to learn from (README "Deviations").
        """
        from net.classifier import build_classifier
        from net.resnet50_cam import load_cam_state
        width = self.resnet50.conv1.out_channels
        require_file(weights_path, "the ID classifier weights (.pth) whose backbone IRN uses with "
                                   "--pretrained none; run train_cam first")
        cam = build_classifier(self.arch, width, "none", "features")
        load_cam_state(cam, weights_path)
        r = self.resnet50
        for ours, theirs in [(r.conv1, cam.stage1[0]), (r.bn1, cam.stage1[1]), (r.layer1, cam.stage1[4]),
                             (r.layer2, cam.stage2[0]), (r.layer3, cam.stage3[0]), (r.layer4, cam.stage4[0])]:
            ours.load_state_dict(theirs.state_dict(), strict=True)
        return self


class AffinityDisplacementLoss(Net):
    """Training module: forward(x) -> per-pair loss terms (docs/method.md §5.2), reduced by train_irn.

    Returns `pos_aff` = -log(a + 1e-5), `neg_aff` = -log(1 + 1e-5 - a) (B, n_dirs, n_src) with `a` the
    affinities of sigmoid(edge), and `dp_fg` = |pd - d|, `dp_bg` = |pd| (B, 2, n_dirs, n_src) with
    pd = disp(p) - disp(p + d). The path-index buffers are not saved (state dict = Net's).
    """

    def __init__(self, path_index, pretrained="none", backbone_width=64, arch=DEFAULT_BACKBONE):
        super().__init__(pretrained=pretrained, backbone_width=backbone_width, arch=arch)
        self.path_index = path_index
        self.n_path_lengths = len(path_index.path_indices)
        for i, pi in enumerate(path_index.path_indices):
            self.register_buffer(f"path_indices{i}", torch.from_numpy(pi), persistent=False)
        disp_target = torch.from_numpy(path_index.search_dst).t().float()  # (2, n_dirs)
        self.register_buffer("disp_target", disp_target[None, :, :, None], persistent=False)

    def path_indices(self):
        return [getattr(self, f"path_indices{i}") for i in range(self.n_path_lengths)]

    def forward(self, x, return_loss=True):
        edge_out, dp_out = super().forward(x)
        if not return_loss:
            return edge_out, dp_out
        if tuple(edge_out.shape[2:]) != self.path_index.size:
            raise ValueError(f"network output {tuple(edge_out.shape[2:])} does not match the path index "
                             f"size {self.path_index.size}")
        aff = indexing.edge_to_affinity(torch.sigmoid(edge_out), self.path_indices())
        pos_aff_loss = -torch.log(aff + 1e-5)
        neg_aff_loss = -torch.log(1. + 1e-5 - aff)
        pair_disp = indexing.pair_displacement(dp_out, self.path_index)
        dp_fg_loss = torch.abs(pair_disp - self.disp_target)
        dp_bg_loss = torch.abs(pair_disp)
        return pos_aff_loss, neg_aff_loss, dp_fg_loss, dp_bg_loss


def inference_size(height, width, crop_size):
    """Padded input size: crop_size x crop_size, or per side the next multiple of 16 when larger.

    The original pads with F.pad to crop_size, which *crops* larger images (README "Deviations").
    """
    step = 16
    def side(n):
        return crop_size if n <= crop_size else -(-n // step) * step
    return side(height), side(width)


class EdgeDisplacement(Net):
    """Inference on an MSF pair (2, 3, H, W) = [x, flip_w(x)] at scale 1.

    Returns `boundary` (h, w) = sigmoid(edge[0]/2 + flip_w(edge[1])/2) and `disp` (2, h, w) = disp[0],
    with (h, w) = ((H-1)//4+1, (W-1)//4+1). The pair is zero-padded (right, bottom) to
    `inference_size` first.
    """

    def __init__(self, crop_size=512, stride=FEATURE_STRIDE, pretrained="none", backbone_width=64,
                 arch=DEFAULT_BACKBONE):
        super().__init__(pretrained=pretrained, backbone_width=backbone_width, arch=arch)
        self.crop_size = crop_size
        self.stride = stride

    def forward(self, x):
        height, width = x.shape[2:]
        feat_h, feat_w = (height - 1) // self.stride + 1, (width - 1) // self.stride + 1
        pad_h, pad_w = inference_size(height, width, self.crop_size)
        x = F.pad(x, [0, pad_w - width, 0, pad_h - height])
        edge_out, dp_out = super().forward(x)
        edge_out = edge_out[..., :feat_h, :feat_w]
        dp_out = dp_out[..., :feat_h, :feat_w]
        boundary = torch.sigmoid(edge_out[0, 0] / 2 + edge_out[1, 0].flip(-1) / 2)
        return boundary, dp_out[0]


# --------------------------------------------------------------------------- building and loading

def new_training_module(path_index, arch, width, pretrained, classifier_weights):
    """AffinityDisplacementLoss on the `arch` backbone of `width` (docs/method.md §2.3): `pretrained`
    ImageNet weights, or with pretrained 'none' the backbone of the ID classifier in `classifier_weights`."""
    no_imagenet = str(pretrained).lower() == "none"
    model = AffinityDisplacementLoss(path_index, pretrained="none" if no_imagenet else pretrained,
                                     backbone_width=width, arch=arch)
    if no_imagenet:
        model.load_backbone_from_classifier(classifier_weights)
    return model


def load_edge_displacement(path, arch, width, crop_size, device):
    """The trained IRN in `path` for inference (EdgeDisplacement padding to `crop_size`), on `device`, in
    eval mode."""
    require_file(path, "the IRN weights (.pth); run train_irn (--train_irn_pass true) "
                       "first or give the released res50_irn.pth")
    model = EdgeDisplacement(crop_size=crop_size, backbone_width=width, arch=arch)
    load_irn_state(model, path)
    return model.to(torch.device(device)).eval()


# The original lists each tensor under several names; (pattern, replacement) to ours, applied until
# none matches (dp_layers.6.4.running_mean -> fc_dp7.4.running_mean -> mean_shift.running_mean).
_ALIASES = [
    (re.compile(r"^stage1\.0\."), "resnet50.conv1."),
    (re.compile(r"^stage1\.1\."), "resnet50.bn1."),
    (re.compile(r"^stage([2-5])\.0\."), lambda m: f"resnet50.layer{int(m.group(1)) - 1}."),
    (re.compile(r"^backbone\.0\.0\."), "resnet50.conv1."),
    (re.compile(r"^backbone\.0\.1\."), "resnet50.bn1."),
    (re.compile(r"^backbone\.([1-4])\.0\."), r"resnet50.layer\1."),
    (re.compile(r"^edge_layers\.([0-5])\."), lambda m: f"fc_edge{int(m.group(1)) + 1}."),
    (re.compile(r"^dp_layers\.([0-6])\."), lambda m: f"fc_dp{int(m.group(1)) + 1}."),
    (re.compile(r"^fc_dp7\.4\.running_mean$"), "mean_shift.running_mean"),
]
# buffers of the original's training module (recomputed from the radius, not weights)
_IGNORED = re.compile(r"^(path_indices\d+|disp_target)$")
_BACKBONE_BLOCK = re.compile(r"^resnet50\.layer([1-4])\.(\d+)\.")  # groups: layer, block


def canonical_key(key):
    """Our name for a key of our own or of the original's state dict (unchanged if unknown)."""
    changed = True
    while changed:
        changed = False
        for pattern, replacement in _ALIASES:
            key, n = pattern.subn(replacement, key)
            changed = changed or bool(n)
    return key


def canonical_state(state, source):
    """(tensors under our names, {our name: first original key}); InputError if two aliases differ."""
    if not isinstance(state, dict):
        raise InputError(f"{source} is not a state dict (got {type(state).__name__})")
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if state and all(k.startswith("module.") for k in state):  # saved from a DataParallel wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    merged, origin = {}, {}
    for key, value in state.items():
        if _IGNORED.match(key):
            continue
        name = canonical_key(key)
        if name in merged:
            if merged[name].shape != value.shape or not torch.equal(merged[name], value):
                raise InputError(f"{source}: {origin[name]} and {key} name the same tensor ({name}) but "
                                 f"differ; the checkpoint is inconsistent")
            continue
        merged[name], origin[name] = value, key
    return merged, origin


def load_irn_state(model, path_or_state, source=None):
    """Load our own or the original's (alias-keyed) IRN state dict into `model`, strictly.

    InputError naming the source and the missing / unexpected / mis-shaped keys otherwise.
    """
    if isinstance(path_or_state, dict):
        state, source = path_or_state, source or "the given state dict"
    else:
        source = source or str(path_or_state)
        state = load_torch(path_or_state)
    merged, origin = canonical_state(state, source)
    require_depth(block_counts(merged, _BACKBONE_BLOCK), model.arch, source)
    return load_canonical_state(model, merged, origin, source, "an IRN (resnet50_irn)",
                                model.resnet50.conv1.out_channels)
