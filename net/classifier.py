"""The CAM classifier every step gets (docs/method.md §2.2), built or loaded from explicit values.

    from net.classifier import build_classifier, load_classifier
    model = build_classifier("resnet50", 64, "sess/resnet50-19c8e357.pth", "train_id")    # train_cam
    model = load_classifier("sess/res50_cam.pth", "resnet50", 64, "cuda", "cam")           # make_cam

`mode` is what the step does with the net:
- "train_id" (train_cam): the paper's recipe from ImageNet weights (frozen BatchNorm, conv1/bn1 frozen,
  stage2's output detached: docs/method.md §2.2); with pretrained 'none' (ToyVOC from scratch, README
  "Deviations") ordinary BatchNorm and every layer trained;
- "cam" (make_cam, train_wood's checkpoint selection): the CAM forward on MSF pairs (`CAM`);
- "features" (mine_ood, train_wood, make_advcam): the classification forward and `feature_list` (`Net`).
"cam" and "features" nets have frozen BatchNorm, frozen conv1/bn1 and nothing detached. IRN builds on the
same backbones (net/resnet50_irn.py `new_training_module`, `load_edge_displacement`).

What the steps need of a backbone: net/resnet.py builds it (an entry of BACKBONES), net/resnet50_cam.py
cuts it into the classifier, net/resnet50_irn.py into IRN's features. A new backbone must give all of:
- the modules conv1, bn1, relu, maxpool, layer1..layer4 with torchvision's parameter names and
  `out_channels` (channels of layer4's output); output stride 16 with strides (2, 2, 2, 1);
- the classifier's stages stage1 = (conv1, bn1, relu, maxpool, layer1), stage2..4 = layer2..4, on which
  resnet50_cam.Net defines `feature_list` (logits, [stage2, stage3, GAP(stage4)] outputs),
  `stage4_features`, `class_maps` (raw CAMs from `classifier.weight`, the 1x1 conv of out_channels -> 20),
  `forward_pairs` (CAM of MSF pairs), the parameter groups `id_param_groups` (train_cam) and
  `wood_param_groups` (stage3 + stage4, classifier: train_wood), and `stem_parameters` (conv1, bn1);
- IRN's split `backbone_features`: x1 = the stem after the max-pool (width channels), x2..x5 = layer1..4
  (4, 8, 16, 32 x width channels), the widths IRN's heads are built for;
- state dicts: ours name the classifier `stage1.0.*` .. `stage4.0.*`, `classifier.weight` and IRN
  `resnet50.{conv1,bn1,layer1..4}.*` (the released checkpoints' prefix, kept for every backbone);
  resnet50_cam.canonical_state / resnet50_irn.canonical_state map the released files' aliases onto them;
- the ImageNet file loader: net/resnet.py `imagenet_state_dict` reads torchvision's file of the entry (its
  URL in BACKBONES, downloaded to sess/<file name> when missing), drops fc.* and loads strictly.
"""
import torch

from misc.utils import require_file
from net.resnet import backbone_spec
from net.resnet50_cam import CAM, Net, load_cam_state

MODES = ("train_id", "cam", "features")
MISSING_HINT = "run train_cam (--train_cam_pass true) first"


def build_classifier(arch, width, pretrained, mode):
    """A new classifier on the `arch` backbone (net/resnet.py) of `width` (64 = the real network) for `mode`
    (MODES), from `pretrained` ImageNet weights (a path or URL) or 'none' (random initialisation)."""
    backbone_spec(arch)  # an unknown name is an InputError before anything is built
    from_scratch = str(pretrained).lower() == "none"
    if mode == "train_id":
        if from_scratch:
            return Net(pretrained="none", width=width, frozen_bn=False, detach_stage2=False, train_stem=True,
                       arch=arch)
        return Net(pretrained=pretrained, width=width, frozen_bn=True, detach_stage2=True, train_stem=False,
                   arch=arch)
    if mode in ("cam", "features"):
        cls = CAM if mode == "cam" else Net
        return cls(pretrained=pretrained, width=width, frozen_bn=True, detach_stage2=False, train_stem=False,
                   arch=arch)
    raise ValueError(f"unknown classifier mode {mode!r}; one of {', '.join(MODES)}")


def load_classifier(path, arch, width, device, mode, hint=MISSING_HINT):
    """The trained classifier in `path` (our own or a released checkpoint) for `mode` ("cam" or "features"),
    on `device`, in eval mode. `hint` completes the error message when the file is missing."""
    if mode not in ("cam", "features"):
        raise ValueError(f"a trained classifier is loaded for 'cam' or 'features', not {mode!r}")
    require_file(path, f"the classifier weights (.pth); {hint}")
    model = build_classifier(arch, width, "none", mode)
    load_cam_state(model, path)
    return model.to(torch.device(device)).eval()
