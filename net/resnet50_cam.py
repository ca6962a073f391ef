"""CAM classifier (docs/method.md §2.2), IRN's net/resnet50_cam.py: backbone stages + a 1x1 conv classifier.

Parameter names (our canonical state dict) are those of the original's `stage1..stage4` and
`classifier`: stage1 = Sequential(conv1, bn1, relu, maxpool, layer1), stage2..4 = Sequential(layerN).
The original also registers the same modules as `resnet50.*`, `backbone.<i>.*` and
`newly_added.0.*`, so its checkpoints list every tensor under several names; `load_cam_state` maps
all of them onto ours (and checks that the copies agree). `backbone` is IRN's [stage1..stage4] in
IRN's Net and [stage3, stage4] in W-OoD's (the paper's released ID classifier): the file decides.
The backbone is ResNet-50 (the paper's) or another entry of net/resnet.py (`arch`); the names are the same.
Steps build and load these nets through net/classifier.py, which says what each step needs of them.

Two training modes (`Net(...)` arguments):
- the paper's (ImageNet weights): frozen BatchNorm, conv1/bn1 never trained, stage2's output detached
  in `forward` (only stage3, stage4 and the classifier learn: the IRN ID-classifier recipe);
- ToyVOC from scratch (`--pretrained none`, README "Deviations"): ordinary BatchNorm, every layer
  trained, nothing detached. Every later step rebuilds the net with frozen BatchNorm and loads those
  weights (net/classifier.py `load_classifier`), so the learnt statistics are then frozen as ImageNet's are.
"""
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from misc.torchutils import gap2d, load_canonical_state
from misc.utils import InputError, load_torch
from net.resnet import DEFAULT_BACKBONE, backbone_spec, block_counts, build_backbone, require_depth

N_CLASSES = 20
STRIDES = (2, 2, 2, 1)
# lr multipliers of the optimizer groups (backbone, classifier), docs/method.md §2.2
PARAM_GROUP_LR_MULT = (1, 10)


class Net(nn.Module):
    """Classification forward: stage1..4 -> GAP -> classifier -> logits (B, 20).

    `detach_stage2`: detach stage2's output in `forward` (the IRN recipe of train_cam); the other
    methods never detach. `train_stem`: whether conv1/bn1 are trainable (only when training from
    scratch). `arch`: the backbone (net/resnet.py BACKBONES).
    """

    def __init__(self, pretrained="none", width=64, frozen_bn=True, detach_stage2=True, train_stem=False,
                 n_classes=N_CLASSES, arch=DEFAULT_BACKBONE):
        super().__init__()
        backbone = build_backbone(arch, pretrained=pretrained, strides=STRIDES, width=width, frozen_bn=frozen_bn)
        self.stage1 = nn.Sequential(backbone.conv1, backbone.bn1, backbone.relu, backbone.maxpool,
                                    backbone.layer1)
        self.stage2 = nn.Sequential(backbone.layer2)
        self.stage3 = nn.Sequential(backbone.layer3)
        self.stage4 = nn.Sequential(backbone.layer4)
        self.classifier = nn.Conv2d(backbone.out_channels, n_classes, 1, bias=False)
        self.n_classes = n_classes
        self.out_channels = backbone.out_channels
        self.arch = arch
        self.detach_stage2 = detach_stage2
        for p in self.stem_parameters():
            p.requires_grad = train_stem

    def stem_parameters(self):
        """conv1 and bn1 (stage1[0], stage1[1]): never trained from ImageNet weights (docs/method.md §2.1)."""
        return list(self.stage1[0].parameters()) + list(self.stage1[1].parameters())

    def forward(self, x):
        x = self.stage2(self.stage1(x))
        if self.detach_stage2:
            x = x.detach()
        x = self.stage4(self.stage3(x))
        return self.classifier(gap2d(x, keepdims=True)).view(-1, self.n_classes)

    def feature_list(self, x):
        """(logits, [stage2 output, stage3 output, GAP(stage4 output) (B, C)]); nothing detached."""
        x2 = self.stage2(self.stage1(x))
        x3 = self.stage3(x2)
        pooled = gap2d(self.stage4(x3), keepdims=True)
        logits = self.classifier(pooled).view(-1, self.n_classes)
        return logits, [x2, x3, pooled.view(pooled.size(0), -1)]

    def stage4_features(self, x):
        """stage4's output (B, C, h/16, w/16); nothing detached (AdvCAM differentiates through it)."""
        return self.stage4(self.stage3(self.stage2(self.stage1(x))))

    def class_maps(self, x):
        """Raw (pre-ReLU) class activation maps `conv2d(stage4(x), classifier.weight)`: (B, 20, h', w')."""
        return F.conv2d(self.stage4_features(x), self.classifier.weight)

    def id_param_groups(self):
        """(trainable backbone parameters, classifier parameters) for train_cam.

        From ImageNet weights this is stage1's layer1 .. stage4 (conv1/bn1 have requires_grad False);
        with stage2 detached only stage3/stage4 ever get gradients (SGD skips the others, as in the
        original, which passes the whole backbone). From scratch it is every backbone parameter.
        """
        backbone = [p for stage in (self.stage1, self.stage2, self.stage3, self.stage4)
                    for p in stage.parameters() if p.requires_grad]
        return backbone, list(self.classifier.parameters())

    def wood_param_groups(self):
        """(stage3 + stage4 parameters, classifier parameters) for W-OoD fine-tuning (docs/method.md §2.2)."""
        return (list(self.stage3.parameters()) + list(self.stage4.parameters()),
                list(self.classifier.parameters()))


class CAM(Net):
    """CAM forward on an MSF pair (2, 3, h, w) = [x, flip_w(x)]: `A[0] + flip_w(A[1])`, A = relu(maps)."""

    def forward(self, x):
        return self.forward_pairs(x.unsqueeze(0))[0]

    def forward_pairs(self, pairs):
        """Several MSF pairs of one size at once: (B, 2, 3, h, w) -> (B, 20, h', w')."""
        maps = F.relu(self.class_maps(pairs.flatten(0, 1)))
        maps = maps.view(pairs.size(0), 2, *maps.shape[1:])
        return maps[:, 0] + maps[:, 1].flip(-1)


# --------------------------------------------------------------------------- checkpoints

# The original module lists each tensor under several names; (pattern, replacement) to ours. The
# `backbone.<i>` aliases differ between the released nets and are resolved per file (backbone_stage_map).
_ALIASES = [
    (re.compile(r"^resnet50\.conv1\."), "stage1.0."),
    (re.compile(r"^resnet50\.bn1\."), "stage1.1."),
    (re.compile(r"^resnet50\.layer1\."), "stage1.4."),
    (re.compile(r"^resnet50\.layer([234])\."), r"stage\1.0."),
    (re.compile(r"^newly_added\.0\."), "classifier."),
]
_BACKBONE_KEY = re.compile(r"^backbone\.(\d+)\.(.+)$")
# a bottleneck's key under our names: stage1.4.<j> is layer1, stage<n>.0.<j> layer<n> (groups: layer, block)
_STAGE_BLOCK = re.compile(r"^stage([1-4])\.[04]\.(\d+)\.")
_STAGES = ("stage1", "stage2", "stage3", "stage4")
_COUNTER = ".num_batches_tracked"


def canonical_key(key):
    """Our parameter name for a key of our own or of the original's state dict (unchanged if unknown;
    `backbone.<i>.*` keys need backbone_stage_map)."""
    for pattern, replacement in _ALIASES:
        new, n = pattern.subn(replacement, key)
        if n:
            return new
    return key


def _sub_keys(keys, prefix):
    return {k[len(prefix):] for k in keys if k.startswith(prefix) and not k.endswith(_COUNTER)}


def backbone_stage_map(keys, expected_keys, source="state dict", title="ResNet-50"):
    """{i: "stage<s>"}: the stage that each `backbone.<i>` of a checkpoint lists, read from the file.

    IRN's Net registers `backbone = [stage1, stage2, stage3, stage4]`, W-OoD's `backbone = [stage3,
    stage4]` (docs/method.md §2.2). The stages of a ResNet differ in structure (stage1 holds the stem, and
    stages 2, 3, 4 have 4, 6, 3 blocks in ResNet-50), so `backbone.<i>` is the one stage whose sub-keys it has,
    exactly; whether its tensors equal the file's other aliases of that stage is checked when merging.
    A damaged file (keys lost or added) maps each `backbone.<i>` to the stage that shares most of its
    sub-keys (more than half, one such stage), so that the strict load names what is missing.
    InputError if no stage fits (`title` names the network in it).
    """
    indices = sorted({int(m.group(1)) for m in map(_BACKBONE_KEY.match, keys) if m})
    stage_keys = {stage: _sub_keys(expected_keys, stage + ".") for stage in _STAGES}
    mapping = {}
    for i in indices:
        own = _sub_keys(keys, f"backbone.{i}.")
        fits = [stage for stage, sub in stage_keys.items() if sub == own]
        if not fits:
            overlap = {stage: len(sub & own) / len(sub | own) for stage, sub in stage_keys.items() if sub | own}
            best = max(overlap.values(), default=0)
            fits = [stage for stage, share in overlap.items() if share == best and share > 0.5]
        if len(fits) != 1:
            raise InputError(f"{source}: backbone.{i}.* ({len(own)} tensors) is not one stage of a {title} CAM "
                             f"classifier (neither IRN's nor W-OoD's alias layout); the file belongs to another "
                             f"network")
        mapping[i] = fits[0]
    return mapping


def unwrapped_state(state, source):
    """The tensors of a checkpoint: the dict itself, its "state_dict" entry, without a DataParallel "module."
    prefix; InputError if it is no dict."""
    if not isinstance(state, dict):
        raise InputError(f"{source} is not a state dict (got {type(state).__name__})")
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if state and all(k.startswith("module.") for k in state):  # saved from a DataParallel wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def canonical_state(state, source="state dict", expected_keys=None, title="ResNet-50"):
    """Map every alias to our names; InputError if two aliases of one tensor differ.

    `expected_keys` (our state dict's keys) resolve the `backbone.<i>` aliases (backbone_stage_map);
    without them such keys stay as they are. `title` names the network in errors.
    """
    state = unwrapped_state(state, source)
    stages = backbone_stage_map(state.keys(), expected_keys, source, title) if expected_keys is not None else {}
    merged, origin = {}, {}
    for key, value in state.items():
        m = _BACKBONE_KEY.match(key)
        name = f"{stages[int(m.group(1))]}.{m.group(2)}" if m and stages else canonical_key(key)
        if name in merged:
            first = merged[name]
            if first.shape != value.shape or not torch.equal(first, value):
                raise InputError(f"{source}: {origin[name]} and {key} name the same tensor ({name}) but "
                                 f"differ; the checkpoint is inconsistent")
            continue
        merged[name], origin[name] = value, key
    return merged, origin


def load_cam_state(model, path_or_state, source=None):
    """Load our own or the original's (alias-keyed) CAM state dict into `model`, strictly.

    InputError naming the file and the missing / unexpected / mis-shaped keys for anything else, or the
    --backbone to pass for a classifier of another registered depth.
    """
    if isinstance(path_or_state, (str, os.PathLike)):
        source = source or str(path_or_state)
        state = load_torch(path_or_state)
    else:
        state, source = path_or_state, source or "the given state dict"
    state = unwrapped_state(state, source)
    require_depth(block_counts(map(canonical_key, state), _STAGE_BLOCK), model.arch, source)
    title = backbone_spec(model.arch).title
    merged, origin = canonical_state(state, source, expected_keys=model.state_dict().keys(), title=title)
    return load_canonical_state(model, merged, origin, source, f"a complete {title} CAM classifier",
                                model.out_channels // 32)
