"""net/resnet.py's backbone registry and net/classifier.py's factory: ResNet-50 (the paper's) and ResNet-101
(torchvision layout), the classifier and IRN on both, and ResNet-101 through the whole tiny pipeline."""
import json
import os
import urllib.error

import pytest
import torch
from test_distributed import pipeline_argv, run_driver

import run_sample
from fakevoc import make_fake_voc, make_ood_pool, random_bn_statistics
from misc import indexing
from misc.utils import InputError, load_torch, save_torch
from net import resnet as resnet_module
from net import resnet50_irn as irn
from net.classifier import build_classifier, load_classifier
from net.resnet import BACKBONES, FixedBatchNorm, ResNet, build_backbone, imagenet_file
from net.resnet50 import ResNet50
from net.resnet50_cam import CAM, Net

WIDTH = 8
ARCHS = ["resnet50", "resnet101"]


def torchvision_keys(blocks):
    """The state-dict keys of torchvision's ResNet (fc removed) with `blocks` bottlenecks per layer."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = {"conv1.weight", *(f"bn1.{p}" for p in bn)}
    for layer, n in enumerate(blocks, 1):
        for block in range(n):
            prefix = f"layer{layer}.{block}."
            keys |= {prefix + f"conv{i}.weight" for i in (1, 2, 3)}
            keys |= {prefix + f"bn{i}.{p}" for i in (1, 2, 3) for p in bn}
        keys |= {f"layer{layer}.0.downsample.0.weight", *(f"layer{layer}.0.downsample.1.{p}" for p in bn)}
    return keys


def test_resnet101_has_torchvision_names_and_resnet50_strides():
    net = build_backbone("resnet101", width=WIDTH).eval()
    assert set(net.state_dict()) == torchvision_keys((3, 4, 23, 3))
    # conv1 + bn1, 33 bottlenecks of 3 convs + 3 BNs, 4 projections of a conv + a BN (5 tensors per BN)
    assert len(net.state_dict()) == (1 + 5) + 33 * (3 + 3 * 5) + 4 * (1 + 5) == 624
    assert [len(getattr(net, f"layer{i}")) for i in range(1, 5)] == [3, 4, 23, 3]
    assert net.layer3[0].conv2.stride == (2, 2) and net.layer3[0].conv1.stride == (1, 1)   # v1.5
    assert net.layer4[0].conv2.stride == (1, 1)
    assert net.out_channels == 32 * WIDTH
    with torch.no_grad():
        assert net(torch.randn(1, 3, 64, 96)).shape == (1, 32 * WIDTH, 4, 6)   # output stride 16
    # the paper's ResNet-50 keeps torchvision's names too, and the registry holds both files
    assert set(ResNet50(width=WIDTH).state_dict()) == torchvision_keys((3, 4, 6, 3))
    assert BACKBONES["resnet101"].imagenet_url == "https://download.pytorch.org/models/resnet101-63fe2227.pth"
    assert imagenet_file("resnet101") == os.path.join("sess", "resnet101-63fe2227.pth")
    assert imagenet_file("resnet50") == os.path.join("sess", "resnet50-19c8e357.pth")


def test_default_backbone_is_the_paper_resnet50_weight_for_weight():
    """torch.manual_seed then build gives the weights that net/resnet50.py's ResNet50 and a Net without `arch`
    give: the factory adds nothing to the random init order."""
    torch.manual_seed(0)
    direct = ResNet50(width=WIDTH).state_dict()
    torch.manual_seed(0)
    built = build_backbone("resnet50", width=WIDTH).state_dict()
    assert list(built) == list(direct) and all(torch.equal(built[k], direct[k]) for k in direct)
    for mode, expected in [("train_id", lambda: Net(width=WIDTH, frozen_bn=False, detach_stage2=False,
                                                    train_stem=True)),
                           ("cam", lambda: CAM(width=WIDTH, frozen_bn=True, detach_stage2=False)),
                           ("features", lambda: Net(width=WIDTH, frozen_bn=True, detach_stage2=False))]:
        torch.manual_seed(1)
        a, next_a = expected().state_dict(), torch.rand(3)
        torch.manual_seed(1)
        b, next_b = build_classifier("resnet50", WIDTH, "none", mode).state_dict(), torch.rand(3)
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a), mode
        assert torch.equal(next_a, next_b), mode   # the generator is left where it was


@pytest.mark.parametrize("arch", ARCHS)
def test_factory_modes_on_each_backbone(arch):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    scratch = build_classifier(arch, WIDTH, "none", "train_id")
    assert type(scratch) is Net and scratch.arch == arch and not scratch.detach_stage2
    assert all(p.requires_grad for p in scratch.parameters())
    assert not any(isinstance(m, FixedBatchNorm) for m in scratch.modules())
    blocks = BACKBONES[arch].blocks
    assert [len(scratch.stage1[4]), len(scratch.stage2[0]), len(scratch.stage3[0]), len(scratch.stage4[0])] == \
        list(blocks)
    backbone, classifier = scratch.id_param_groups()
    assert len(backbone) + len(classifier) == len(list(scratch.parameters()))

    cam = build_classifier(arch, WIDTH, "none", "cam").eval()
    assert type(cam) is CAM and not cam.detach_stage2
    assert not any(p.requires_grad for p in cam.stem_parameters())
    features = build_classifier(arch, WIDTH, "none", "features").eval()
    assert type(features) is Net
    with torch.no_grad():
        assert cam(x).shape == (20, 4, 4)                       # the MSF pair's CAM at stride 16
        logits, feats = features.feature_list(x)
        assert logits.shape == (2, 20)
        assert [tuple(f.shape) for f in feats] == [(2, 8 * WIDTH, 8, 8), (2, 16 * WIDTH, 4, 4), (2, 32 * WIDTH)]
        assert features.class_maps(x).shape == (2, 20, 4, 4)
    stage34, cls = features.wood_param_groups()
    assert len(stage34) == len(list(features.stage3.parameters())) + len(list(features.stage4.parameters()))
    with pytest.raises(ValueError, match="unknown classifier mode 'seg'"):
        build_classifier(arch, WIDTH, "none", "seg")

    net = irn.Net(backbone_width=WIDTH, arch=arch)
    xs = net.backbone_features(x)
    assert [tuple(t.shape[1:]) for t in xs] == [(WIDTH, 16, 16), (4 * WIDTH, 16, 16), (8 * WIDTH, 8, 8),
                                                (16 * WIDTH, 4, 4), (32 * WIDTH, 4, 4)]
    edge, disp = net(x)
    assert edge.shape == (2, 1, 16, 16) and disp.shape == (2, 2, 16, 16)
    assert len(net.resnet50.layer3) == blocks[2]


def test_unknown_backbone_is_one_input_error():
    with pytest.raises(InputError, match="unknown backbone 'vgg16': --backbone is one of resnet50, resnet101"):
        build_classifier("vgg16", WIDTH, "none", "cam")
    parser = run_sample.build_parser()
    choices = next(a.choices for a in parser._actions if a.dest == "backbone")
    assert choices == list(BACKBONES)   # the driver offers exactly the registry
    assert run_sample.parse_args(["--device", "cpu"]).backbone == "resnet50"


def test_resnet101_imagenet_file_loads_like_resnet50s(tmp_path, monkeypatch):
    torch.manual_seed(3)
    source = random_bn_statistics(ResNet((3, 4, 23, 3), width=WIDTH))
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in source.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 32 * WIDTH), torch.randn(1000)
    path = str(tmp_path / "r101.pth")
    save_torch(path, state)
    loaded = build_backbone("resnet101", pretrained=path, width=WIDTH)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items() if not k.startswith("fc."))
    # through the factory: the classifier's stages hold the file's tensors
    model = build_classifier("resnet101", WIDTH, path, "train_id")
    assert model.detach_stage2 and torch.equal(model.stage3[0][22].conv3.weight, state["layer3.22.conv3.weight"])
    assert torch.equal(model.stage1[0].weight, state["conv1.weight"])

    with pytest.raises(InputError, match=r"holds a ResNet-101 \(bottlenecks 3, 4, 23, 3\), the network is built "
                                         r"with --backbone resnet50: pass --backbone resnet101"):
        build_backbone("resnet50", pretrained=path, width=WIDTH)
    with pytest.raises(InputError, match="holds a ResNet-101 of width 8.*--backbone_width 8"):
        build_backbone("resnet101", pretrained=path, width=16)

    # the default file is fetched from torchvision's URL when missing; offline, the error says what to do
    monkeypatch.chdir(tmp_path)
    fetched = []

    def offline(url, dst, progress=True):
        fetched.append((url, dst))
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(resnet_module.torch.hub, "download_url_to_file", offline)
    default = imagenet_file("resnet101")
    with pytest.raises(InputError) as err:
        build_backbone("resnet101", pretrained=default, width=WIDTH)
    assert fetched == [("https://download.pytorch.org/models/resnet101-63fe2227.pth", default)]
    assert str(err.value) == (
        "cannot download ImageNet weights from https://download.pytorch.org/models/resnet101-63fe2227.pth "
        "(<urlopen error no network>). Download resnet101-63fe2227.pth by hand and put it at "
        "sess/resnet101-63fe2227.pth, or pass --pretrained <path> (or --pretrained none for ToyVOC).")
    # ResNet-50's file given to a ResNet-101: named before anything is downloaded
    with pytest.raises(InputError, match=r"--pretrained sess/resnet50-19c8e357.pth is torchvision's ResNet-50, the "
                                         r"network is built with --backbone resnet101: pass --pretrained "
                                         r"sess/resnet101-63fe2227.pth"):
        build_backbone("resnet101", pretrained=imagenet_file("resnet50"), width=WIDTH)
    assert len(fetched) == 1


def test_load_classifier_and_irn_on_resnet101(tmp_path):
    torch.manual_seed(0)
    trained = random_bn_statistics(build_classifier("resnet101", WIDTH, "none", "train_id"))
    path = str(tmp_path / "cam101.pth")
    save_torch(path, trained.state_dict())
    model = load_classifier(path, "resnet101", WIDTH, "cpu", "cam")
    assert type(model) is CAM and not model.training
    x = torch.randn(2, 3, 48, 56)
    with torch.no_grad():
        assert torch.allclose(Net.forward(model, x), trained.eval()(x), atol=1e-6)
    with pytest.raises(InputError, match=r"cam101.pth holds a ResNet-101 .* --backbone resnet50: pass --backbone "
                                         r"resnet101"):
        load_classifier(path, "resnet50", WIDTH, "cpu", "features")
    with pytest.raises(ValueError, match="'cam' or 'features'"):
        load_classifier(path, "resnet101", WIDTH, "cpu", "train_id")

    # IRN from the classifier's backbone (--pretrained none) and back from its own file
    module = irn.new_training_module(indexing.PathIndex(5, (16, 16)), "resnet101", WIDTH, "none", path)
    assert torch.equal(module.resnet50.layer3[22].conv3.weight, trained.stage3[0][22].conv3.weight)
    irn_path = str(tmp_path / "irn101.pth")
    save_torch(irn_path, module.state_dict())
    infer = irn.load_edge_displacement(irn_path, "resnet101", WIDTH, 64, "cpu")
    assert torch.equal(infer.resnet50.layer3[22].bn2.running_var, trained.stage3[0][22].bn2.running_var)
    with pytest.raises(InputError, match="irn101.pth holds a ResNet-101"):
        irn.load_edge_displacement(irn_path, "resnet50", WIDTH, 64, "cpu")


def calibrated_backbone(blocks, seed=0):
    """A random "ImageNet" backbone whose BatchNorm statistics are those of its own activations on random
    images: random statistics let 33 residual blocks blow the activations up (the loss diverges)."""
    torch.manual_seed(seed)
    net = ResNet(blocks, width=WIDTH, frozen_bn=False).train()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None   # the running statistics become the batch's
    with torch.no_grad():
        net(torch.randn(8, 3, 64, 64))
    return net


def test_resnet101_through_the_tiny_pipeline(tmp_path):
    """train_cam -> mine_ood -> train_wood -> make_cam -> make_advcam -> cam_to_ir_label -> train_irn ->
    make_sem_seg with --backbone resnet101 (width 8, 64 px): every net is a ResNet-101, every record says so."""
    voc = make_fake_voc(tmp_path / "VOC2012", n_train=4, n_val=2, size=64, seed=0)
    pool = tmp_path / "pool"
    make_ood_pool(pool, 4, pool / "candidates.txt")
    save_torch(str(tmp_path / "backbone.pth"), calibrated_backbone((3, 4, 23, 3)).state_dict())
    work = tmp_path / "work"
    argv = pipeline_argv(tmp_path, voc, work)
    argv[argv.index("--cam_num_epoches") + 1] = argv[argv.index("--wood_num_epoches") + 1] = "1"
    run_driver([*argv, "--backbone", "resnet101"], tmp_path / "run.log")

    for name, prefix in [("cam.pth", "stage3.0."), ("wood.pth", "stage3.0."), ("irn.pth", "resnet50.layer3.")]:
        state = load_torch(str(work / name))
        assert prefix + "22.conv3.weight" in state and prefix + "23.conv3.weight" not in state, name
    for name in ("train_cam", "train_wood"):
        record = json.load(open(work / f"{name.split('_')[1]}.pth.provenance.json"))
        assert record["step"] == name and record["inputs"]["backbone"] == "resnet101"
    assert json.load(open(work / "irn.pth.provenance.json"))["inputs"]["backbone_arch"] == "resnet101"
    for folder in ("wood_cam", "wood_advcam", "pseudo_mask"):
        assert json.load(open(work / folder / "provenance.json"))["inputs"]["backbone"] == "resnet101", folder
        assert len([f for f in os.listdir(work / folder) if f.endswith((".npz", ".png"))]) == 4, folder
    assert json.load(open(work / "ood_list.txt.provenance.json"))["inputs"]["backbone"] == "resnet101"
