import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from misc.utils import InputError, save_torch
from net import resnet50 as resnet50_module
from net.classifier import build_classifier, load_classifier
from net.resnet50_cam import CAM, Net, backbone_stage_map, canonical_key, load_cam_state

WIDTH = 8


class OriginalStyleNet(nn.Module):
    """The module layout of the released resnet50_cam.Net (every tensor listed under 2-3 names): IRN's
    `backbone = [stage1..stage4]`, or W-OoD's `backbone = [stage3, stage4]` (the paper's released file)."""

    def __init__(self, layout="irn"):
        super().__init__()
        self.resnet50 = resnet50_module.resnet50(width=WIDTH)
        r = self.resnet50
        self.stage1 = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1)
        self.stage2 = nn.Sequential(r.layer2)
        self.stage3 = nn.Sequential(r.layer3)
        self.stage4 = nn.Sequential(r.layer4)
        self.classifier = nn.Conv2d(r.out_channels, 20, 1, bias=False)
        self.backbone = nn.ModuleList([self.stage1, self.stage2, self.stage3, self.stage4] if layout == "irn"
                                      else [self.stage3, self.stage4])
        self.newly_added = nn.ModuleList([self.classifier])

    def logits(self, x):
        x = self.stage4(self.stage3(self.stage2(self.stage1(x))))
        return self.classifier(x.mean(dim=(2, 3), keepdim=True)).view(-1, 20)

    def cam(self, x):
        x = F.relu(F.conv2d(self.stage4(self.stage3(self.stage2(self.stage1(x)))), self.classifier.weight))
        return x[0] + x[1].flip(-1)


def _randomise_bn(model, seed=0):
    """Non-trivial running statistics and affine parameters, so that loading them is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def _pair(h=40, w=56, seed=1):
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(seed))
    return torch.cat([x, x.flip(-1)])


@pytest.fixture(scope="module")
def original():
    torch.manual_seed(0)
    return _randomise_bn(OriginalStyleNet()).eval()


def test_original_checkpoint_has_aliases_and_loads_with_identical_outputs(original, tmp_path):
    state = original.state_dict()
    for alias in ["resnet50.conv1.weight", "stage1.0.weight", "backbone.0.0.weight", "resnet50.layer2.0.conv1.weight",
                  "stage2.0.0.conv1.weight", "backbone.1.0.0.conv1.weight", "newly_added.0.weight",
                  "classifier.weight", "resnet50.bn1.running_var", "stage1.1.running_var"]:
        assert alias in state
    path = tmp_path / "released.pth"
    torch.save(state, path)
    torch.manual_seed(123)  # a differently initialised model
    model = CAM(width=WIDTH, frozen_bn=True, detach_stage2=False).eval()
    x = _pair()
    assert not torch.allclose(model(x), original.cam(x))
    load_cam_state(model, str(path))
    with torch.no_grad():
        assert torch.equal(model(x), original.cam(x))
        assert torch.equal(Net.forward(model, x), original.logits(x))
    # our own state dict has one name per tensor and round-trips
    ours = model.state_dict()
    assert not any(k.startswith(("resnet50.", "backbone.", "newly_added.")) for k in ours)
    assert len(ours) < len(state)
    again = load_cam_state(CAM(width=WIDTH), ours)
    assert torch.equal(again.eval()(x), model(x))


def test_canonical_key():
    assert canonical_key("resnet50.conv1.weight") == "stage1.0.weight"
    assert canonical_key("resnet50.bn1.bias") == "stage1.1.bias"
    assert canonical_key("resnet50.layer1.2.conv3.weight") == "stage1.4.2.conv3.weight"
    assert canonical_key("resnet50.layer3.0.downsample.1.weight") == "stage3.0.0.downsample.1.weight"
    assert canonical_key("backbone.3.0.1.bn2.weight") == "backbone.3.0.1.bn2.weight"  # per file: below
    assert canonical_key("newly_added.0.weight") == "classifier.weight"
    assert canonical_key("stage2.0.0.conv1.weight") == "stage2.0.0.conv1.weight"


@pytest.mark.parametrize("layout", ["irn", "wood"])
def test_both_released_alias_layouts_give_the_cams_of_our_own_checkpoint(layout, tmp_path):
    torch.manual_seed(0)
    released = _randomise_bn(OriginalStyleNet(layout)).eval()
    state = released.state_dict()
    if layout == "wood":  # docs/method.md §2.2: backbone.0.0 = stage3.0 = resnet50.layer3, backbone.1.0 = layer4
        assert torch.equal(state["backbone.0.0.0.conv1.weight"], state["resnet50.layer3.0.conv1.weight"])
        assert torch.equal(state["backbone.1.0.2.bn3.bias"], state["resnet50.layer4.2.bn3.bias"])
        assert not any(k.startswith(("backbone.2.", "backbone.3.")) for k in state)
    path = tmp_path / f"{layout}.pth"
    torch.save(state, path)
    ours = {k: v for k, v in state.items() if k.startswith(("stage", "classifier."))}  # our own layout
    x = _pair()
    with torch.no_grad():
        own = load_cam_state(CAM(width=WIDTH), ours).eval()(x)
        assert torch.equal(load_cam_state(CAM(width=WIDTH), str(path)).eval()(x), own)
        assert torch.equal(own, released.cam(x))


def test_backbone_stage_map_is_read_from_the_file():
    expected = CAM(width=WIDTH).state_dict().keys()
    irn = OriginalStyleNet("irn").state_dict().keys()
    wood = OriginalStyleNet("wood").state_dict().keys()
    assert backbone_stage_map(irn, expected) == {0: "stage1", 1: "stage2", 2: "stage3", 3: "stage4"}
    assert backbone_stage_map(wood, expected) == {0: "stage3", 1: "stage4"}
    # backbone-only files (no other alias to compare with) are read by structure alike
    only = [k for k in wood if k.startswith(("backbone.", "stage1", "stage2", "classifier"))]
    assert backbone_stage_map(only, expected) == {0: "stage3", 1: "stage4"}
    damaged = [k for k in wood if not k.startswith("backbone.0.0.5.conv1.")]  # a tensor lost: still stage3
    assert backbone_stage_map(damaged, expected) == {0: "stage3", 1: "stage4"}
    foreign = [k for k in wood if not k.startswith("backbone.1.")] + ["backbone.1.head.weight"]
    with pytest.raises(InputError, match=r"x.pth: backbone\.1\.\* \(1 tensors\) is not one stage"):
        backbone_stage_map(foreign, expected, "x.pth")


def test_truncated_checkpoint_is_a_clear_error(original, tmp_path):
    state = original.state_dict()
    removed = "stage4.0.2.conv3.weight"
    truncated = {k: v for k, v in state.items()
                 if not k.endswith(("layer4.2.conv3.weight", "stage4.0.2.conv3.weight", "backbone.3.0.2.conv3.weight"))}
    truncated["extra.head.weight"] = torch.zeros(1)
    path = tmp_path / "truncated.pth"
    torch.save(truncated, path)
    with pytest.raises(InputError) as err:
        load_cam_state(CAM(width=WIDTH), str(path))
    msg = str(err.value)
    assert str(path) in msg and removed in msg and "extra.head.weight" in msg
    assert "1 missing key" in msg and "1 unexpected key" in msg


def test_inconsistent_aliases_and_wrong_width_are_errors(original, tmp_path):
    state = dict(original.state_dict())
    state["backbone.0.0.weight"] = state["backbone.0.0.weight"] + 1
    with pytest.raises(InputError, match="differ"):
        load_cam_state(CAM(width=WIDTH), state)
    with pytest.raises(InputError, match="wrong shape.*backbone_width"):
        load_cam_state(CAM(width=16), original.state_dict())
    with pytest.raises(InputError, match="not a state dict"):
        load_cam_state(CAM(width=WIDTH), [1, 2], source="x.pth")


def test_missing_num_batches_tracked_is_accepted(original):
    state = {k: v for k, v in original.state_dict().items() if not k.endswith("num_batches_tracked")}
    model = load_cam_state(CAM(width=WIDTH), state).eval()
    x = _pair()
    with torch.no_grad():
        assert torch.equal(model(x), original.cam(x))


def test_frozen_bn_really_frozen_in_train_mode():
    torch.manual_seed(0)
    model = _randomise_bn(Net(width=WIDTH, frozen_bn=True))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 48, 48)
    model.eval()
    with torch.no_grad():
        eval_out = model(x)
    model.train()
    train_out = model(x)
    assert torch.equal(train_out.detach(), eval_out)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # ordinary BatchNorm (ToyVOC's from-scratch ID training) does use batch statistics
    scratch = _randomise_bn(Net(width=WIDTH, frozen_bn=False)).train()
    stats = scratch.stage2[0][0].bn1.running_mean.clone()
    scratch(x)
    assert not torch.equal(scratch.stage2[0][0].bn1.running_mean, stats)


def _names(model, params):
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_param_groups_paper_recipe():
    torch.manual_seed(0)
    model = Net(width=WIDTH, frozen_bn=True, detach_stage2=True, train_stem=False)
    backbone, classifier = model.id_param_groups()
    stem = {"stage1.0.weight", "stage1.1.weight", "stage1.1.bias"}
    assert _names(model, classifier) == {"classifier.weight"}
    all_names = {n for n, _ in model.named_parameters()}
    assert _names(model, backbone) == all_names - stem - {"classifier.weight"}
    assert all(not p.requires_grad for p in model.stem_parameters())
    # with stage2 detached only stage3, stage4 and the classifier get gradients
    model.train()
    F.multilabel_soft_margin_loss(model(torch.randn(2, 3, 48, 48)), torch.ones(2, 20)).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n in all_names if n.startswith(("stage3.", "stage4.", "classifier."))}
    stage34, cls = model.wood_param_groups()
    assert _names(model, stage34) == {n for n in all_names if n.startswith(("stage3.", "stage4."))}
    assert _names(model, cls) == {"classifier.weight"}


def test_from_scratch_trains_everything():
    model = build_classifier("resnet50", WIDTH, "none", "train_id")
    assert not model.detach_stage2
    assert isinstance(model.stage2[0][0].bn1, nn.BatchNorm2d)
    assert not isinstance(model.stage2[0][0].bn1, resnet50_module.FixedBatchNorm)
    backbone, classifier = model.id_param_groups()
    assert len(backbone) + len(classifier) == len(list(model.parameters()))
    model.train()
    F.multilabel_soft_margin_loss(model(torch.randn(2, 3, 48, 48)), torch.ones(2, 20)).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_cam_forward_is_the_literal_formula_and_feature_list():
    torch.manual_seed(0)
    model = _randomise_bn(CAM(width=WIDTH)).eval()
    x = _pair(37, 50)
    with torch.no_grad():
        feats = model.stage4(model.stage3(model.stage2(model.stage1(x))))
        a = F.relu(F.conv2d(feats, model.classifier.weight))
        literal = a[0] + torch.flip(a[1], dims=[2])
        out = model(x)
        assert out.shape == (20, 3, 4) and torch.equal(out, literal)
        assert torch.equal(model.stage4_features(x), feats)
        assert torch.equal(model.class_maps(x), F.conv2d(feats, model.classifier.weight))
        # several pairs of one size in one forward
        y = _pair(37, 50, seed=5)
        both = model.forward_pairs(torch.stack([x, y]))
        assert torch.allclose(both[0], out, atol=1e-5) and torch.allclose(both[1], model(y), atol=1e-5)
        logits, features = model.feature_list(x)
        assert torch.allclose(logits, Net.forward(model, x), atol=1e-6)
        assert [f.shape for f in features] == [(2, 8 * WIDTH, 5, 7), (2, 16 * WIDTH, 3, 4), (2, 32 * WIDTH)]
        assert torch.allclose(features[2], feats.mean(dim=(2, 3)), atol=1e-6)


def test_load_classifier(tmp_path):
    torch.manual_seed(0)
    trained = _randomise_bn(Net(width=WIDTH, frozen_bn=False, detach_stage2=False, train_stem=True))
    path = str(tmp_path / "cam.pth")
    save_torch(path, trained.state_dict())
    model = load_classifier(path, "resnet50", WIDTH, "cpu", "cam")
    assert isinstance(model, CAM) and not model.training and not model.detach_stage2
    assert isinstance(model.stage3[0][0].bn1, resnet50_module.FixedBatchNorm)
    x = _pair()
    with torch.no_grad():
        assert torch.allclose(Net.forward(model, x), trained.eval()(x), atol=1e-6)
    with pytest.raises(InputError, match="run train_cam"):
        load_classifier(str(tmp_path / "nope.pth"), "resnet50", WIDTH, "cpu", "cam")
