"""net/resnet50_irn.py, voc12/affinity.py and step/train_irn.py (docs/method.md §2.3, §5.2)."""
import argparse
import os

import numpy as np
import pytest
import torch
from test_indexing import literal_path

from misc import imutils, indexing
from misc.utils import InputError, save_png, save_torch
from net import resnet50_cam
from net import resnet50_irn as irn
from step import train_irn

WIDTH = 8


def _input(b=2, h=64, w=64, seed=0):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _randomise(model, seed=0):
    """Non-trivial weights everywhere (BN statistics, GN affine, mean shift), so that copies are checked."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.dtype.is_floating_point:
                if "running_var" in name:
                    t.copy_(0.5 + torch.rand(t.shape, generator=g))
                else:
                    t.add_(0.1 * torch.randn(t.shape, generator=g))
    return model


def test_shapes_channels_and_frozen_backbone():
    net = irn.Net(backbone_width=WIDTH)
    x = _input()
    x1, x2, x3, x4, x5 = net.backbone_features(x)
    assert [t.shape[1] for t in (x1, x2, x3, x4, x5)] == [WIDTH, 4 * WIDTH, 8 * WIDTH, 16 * WIDTH, 32 * WIDTH]
    assert [t.shape[2] for t in (x1, x2, x3, x4, x5)] == [16, 16, 8, 4, 4]
    edge, disp = net(x)
    assert edge.shape == (2, 1, 16, 16) and disp.shape == (2, 2, 16, 16)
    # head widths are docs/method.md §2.3's at any backbone width
    assert net.fc_edge1[0].weight.shape == (32, WIDTH, 1, 1) and net.fc_edge6.weight.shape == (1, 160, 1, 1)
    assert net.fc_dp6[0].weight.shape == (256, 768, 1, 1) and net.fc_dp7[0].weight.shape == (256, 448, 1, 1)
    assert net.fc_dp7[3].weight.shape == (2, 256, 1, 1) and net.fc_dp7[3].bias is None
    assert [type(m).__name__ for m in net.fc_edge3] == ["Conv2d", "GroupNorm", "Bilinear", "ReLU"]
    assert net.fc_edge3[1].num_groups == 4 and net.fc_dp2[1].num_groups == 16 and net.fc_dp1[1].num_groups == 8
    assert net.fc_edge4[2].scale_factor == 4 and net.fc_dp4[2].scale_factor == 2
    probe = torch.randn(1, 2, 5, 6)  # IRN's bilinear, align_corners=False
    assert torch.equal(net.fc_edge4[2](probe), torch.nn.functional.interpolate(probe, scale_factor=4, mode="bilinear",
                                                                               align_corners=False))

    # param groups: every head parameter in exactly one group, no backbone parameter
    edge_params, dp_params = net.trainable_parameters()
    head = {id(p) for n, p in net.named_parameters() if not n.startswith("resnet50.")}
    assert {id(p) for p in edge_params} | {id(p) for p in dp_params} == head
    assert not {id(p) for p in edge_params} & {id(p) for p in dp_params}
    assert len(edge_params) == 3 * 5 + 2 and len(dp_params) == 3 * 7 + 1

    # train(): heads train, backbone eval; a backward pass reaches the heads only
    net.train()
    assert net.fc_edge1.training and not net.resnet50.training
    edge, disp = net(x)
    (edge.sum() + disp.sum()).backward()
    assert all(p.grad is None for p in net.resnet50.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in edge_params + dp_params
               if p.dim() > 1)


def test_mean_shift_only_in_eval():
    net = _randomise(irn.Net(backbone_width=WIDTH))
    net.mean_shift.running_mean.copy_(torch.tensor([0.25, -1.5]))
    x = _input()
    with torch.no_grad():
        _, d_train = net.train()(x)
        _, d_eval = net.eval()(x)
    assert torch.allclose(d_train - d_eval, torch.tensor([0.25, -1.5]).view(1, 2, 1, 1).expand_as(d_train),
                          atol=1e-6)


def test_edge_displacement_pads_crops_and_flips():
    source = _randomise(irn.Net(backbone_width=WIDTH)).eval()
    model = irn.EdgeDisplacement(crop_size=64, backbone_width=WIDTH)
    model.load_state_dict(source.state_dict())
    model.eval()
    for h, w, padded in [(50, 37, (64, 64)), (70, 37, (80, 64)), (64, 64, (64, 64))]:
        img = torch.randn(3, h, w, generator=torch.Generator().manual_seed(h))
        pair = torch.stack([img, img.flip(-1)])
        with torch.no_grad():
            boundary, disp = model(pair)
            canvas = torch.zeros(2, 3, *padded)
            canvas[:, :, :h, :w] = pair
            edge, dp = source(canvas)
        fh, fw = (h - 1) // 4 + 1, (w - 1) // 4 + 1
        assert irn.inference_size(h, w, 64) == padded
        assert boundary.shape == (fh, fw) and disp.shape == (2, fh, fw)
        expected = torch.sigmoid(edge[0, 0, :fh, :fw] / 2 + edge[1, 0, :fh, :fw].flip(-1) / 2)
        assert torch.allclose(boundary, expected, atol=1e-6)
        assert torch.allclose(disp, dp[0, :, :fh, :fw], atol=1e-6)


def _original_style(state, radius=5, size=(16, 16)):
    """The released checkpoints' layout: every module under each of its registered names, plus the
    training module's index buffers."""
    out = dict(state)
    backbone = {"conv1": ("stage1.0", "backbone.0.0"), "bn1": ("stage1.1", "backbone.0.1")}
    for i in range(1, 5):
        backbone[f"layer{i}"] = (f"stage{i + 1}.0", f"backbone.{i}.0")
    for key, value in state.items():
        if key.startswith("resnet50."):
            module, rest = key[len("resnet50."):].split(".", 1)
            for alias in backbone[module]:
                out[f"{alias}.{rest}"] = value.clone()
        for prefix, alias, n in (("fc_edge", "edge_layers", 6), ("fc_dp", "dp_layers", 7)):
            for i in range(1, n + 1):
                if key.startswith(f"{prefix}{i}."):
                    out[f"{alias}.{i - 1}." + key[len(f"{prefix}{i}."):]] = value.clone()
    out["fc_dp7.4.running_mean"] = state["mean_shift.running_mean"].clone()
    out["dp_layers.6.4.running_mean"] = state["mean_shift.running_mean"].clone()
    index = indexing.PathIndex(radius, size)
    for i, pi in enumerate(index.path_indices):
        out[f"path_indices{i}"] = torch.from_numpy(pi)
    out["disp_target"] = torch.from_numpy(index.search_dst).t().float()[None, :, :, None]
    return out


def test_released_checkpoint_with_aliases_loads(tmp_path):
    source = _randomise(irn.EdgeDisplacement(crop_size=64, backbone_width=WIDTH)).eval()
    original = _original_style(source.state_dict())
    assert "stage5.0.0.conv1.weight" in original and "edge_layers.5.bias" in original
    path = str(tmp_path / "res50_irn.pth")
    save_torch(path, original)
    loaded = irn.EdgeDisplacement(crop_size=64, backbone_width=WIDTH)
    irn.load_irn_state(loaded, path)
    loaded.eval()
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    pair = _input(seed=3)
    with torch.no_grad():
        for a, b in zip(source(pair), loaded(pair)):
            assert torch.equal(a, b)

    # our own checkpoints (what train_irn writes) and a DataParallel prefix load too
    irn.load_irn_state(irn.Net(backbone_width=WIDTH), {"module." + k: v for k, v in source.state_dict().items()})

    bad = dict(original)
    bad["backbone.2.0.1.conv1.weight"] = bad["backbone.2.0.1.conv1.weight"] + 1
    with pytest.raises(InputError, match=r"resnet50\.layer2\.1\.conv1\.weight and backbone\.2\.0\.1\.conv1\.weight"):
        irn.load_irn_state(loaded, bad, source="bad.pth")
    bad = {k: v for k, v in original.items() if not k.endswith("fc_edge6.bias") and k != "edge_layers.5.bias"}
    with pytest.raises(InputError, match=r"bad\.pth.*missing key\(s\): fc_edge6\.bias"):
        irn.load_irn_state(loaded, bad, source="bad.pth")
    bad = dict(original, **{"fc_extra.weight": torch.zeros(1)})
    with pytest.raises(InputError, match=r"unexpected key\(s\): fc_extra\.weight"):
        irn.load_irn_state(loaded, bad, source="bad.pth")
    with pytest.raises(InputError, match="wrong shape"):
        irn.load_irn_state(irn.Net(backbone_width=16), original, source="bad.pth")
    with pytest.raises(InputError, match="not an IRN"):  # a CAM checkpoint given by mistake
        irn.load_irn_state(loaded, resnet50_cam.Net(width=WIDTH).state_dict(), source="cam.pth")


def test_backbone_from_the_id_classifier(tmp_path):
    cam = _randomise(resnet50_cam.Net(pretrained="none", width=WIDTH, frozen_bn=False), seed=5)
    path = str(tmp_path / "cam.pth")
    save_torch(path, cam.state_dict())
    model = irn.new_training_module(indexing.PathIndex(5, (16, 16)), "resnet50", WIDTH, "none", path)
    r = model.resnet50
    for ours, theirs in [(r.conv1, cam.stage1[0]), (r.bn1, cam.stage1[1]), (r.layer1, cam.stage1[4]),
                         (r.layer2, cam.stage2[0]), (r.layer3, cam.stage3[0]), (r.layer4, cam.stage4[0])]:
        for (k, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
            assert torch.equal(a, b), k
    # the backbone computes what the classifier's stages compute (frozen BN on both)
    cam_frozen = resnet50_cam.Net(pretrained="none", width=WIDTH, frozen_bn=True, detach_stage2=False)
    resnet50_cam.load_cam_state(cam_frozen, path)
    x = _input()
    with torch.no_grad():
        x5 = model.backbone_features(x)[4]
        assert torch.allclose(x5, cam_frozen.stage4_features(x), atol=1e-5)
    with pytest.raises(InputError, match="absent.pth"):
        irn.new_training_module(indexing.PathIndex(5, (16, 16)), "resnet50", WIDTH, "none",
                                str(tmp_path / "absent.pth"))


@pytest.mark.parametrize("radius", [3, 5])
def test_loss_terms_against_loops(radius):
    index = indexing.PathIndex(radius, (16, 16))
    model = _randomise(irn.AffinityDisplacementLoss(index, backbone_width=WIDTH)).train()
    assert not any(k.startswith(("path_indices", "disp_target")) for k in model.state_dict())
    x = _input(seed=radius)
    with torch.no_grad():
        pos, neg, dp_fg, dp_bg = model(x, True)
        edge, disp = model(x, return_loss=False)
    prob = torch.sigmoid(edge).double()
    disp = disp.double()
    rf = radius - 1
    sources = [(y, x_) for y in range(16 - rf) for x_ in range(rf, 16 - rf)]
    dirs = [tuple(d) for d in index.search_dst.tolist()]
    assert pos.shape == neg.shape == (2, len(dirs), len(sources))
    assert dp_fg.shape == dp_bg.shape == (2, 2, len(dirs), len(sources))
    for b in range(2):
        for k, (dy, dx) in enumerate(dirs):
            path = literal_path((dy, dx))
            for s, (y, x_) in enumerate(sources):
                a = 1 - max(prob[b, 0, y + qy, x_ + qx].item() for qy, qx in path)
                assert abs(pos[b, k, s].item() - (-np.log(a + 1e-5))) < 1e-4
                assert abs(neg[b, k, s].item() - (-np.log(1 + 1e-5 - a))) < 1e-4
                pd = (disp[b, :, y, x_] - disp[b, :, y + dy, x_ + dx]).numpy()
                np.testing.assert_allclose(dp_fg[b, :, k, s].numpy(), np.abs(pd - [dy, dx]), atol=1e-5)
                np.testing.assert_allclose(dp_bg[b, :, k, s].numpy(), np.abs(pd), atol=1e-5)


def test_irn_losses_against_the_formulas():
    g = torch.Generator().manual_seed(0)
    shape = (2, 7, 11)
    pos, neg = torch.rand(shape, generator=g, dtype=torch.float64) * 3, torch.rand(shape, generator=g,
                                                                                     dtype=torch.float64)
    dp_fg, dp_bg = (torch.rand((2, 2, 7, 11), generator=g, dtype=torch.float64) for _ in range(2))
    labels = torch.randint(0, 4, shape, generator=g)
    bg, fg, ng = [(labels == v).double() for v in (1, 2, 3)]
    out = train_irn.irn_losses(pos, neg, dp_fg, dp_bg, bg, fg, ng)
    P, N, F_, B_ = pos.numpy(), neg.numpy(), dp_fg.numpy(), dp_bg.numpy()
    lab = labels.numpy()
    bg_sum = sum(P[i] for i in np.ndindex(shape) if lab[i] == 1)
    fg_sum = sum(P[i] for i in np.ndindex(shape) if lab[i] == 2)
    ng_sum = sum(N[i] for i in np.ndindex(shape) if lab[i] == 3)
    n_bg, n_fg, n_ng = [(lab == v).sum() for v in (1, 2, 3)]
    dfg = sum(F_[b, c, i, j] for b, c, i, j in np.ndindex(F_.shape) if lab[b, i, j] == 2)
    dbg = sum(B_[b, c, i, j] for b, c, i, j in np.ndindex(B_.shape) if lab[b, i, j] == 1)
    expected = {"bg_pos": bg_sum / (n_bg + 1e-5), "fg_pos": fg_sum / (n_fg + 1e-5), "neg": ng_sum / (n_ng + 1e-5),
                "dp_fg": dfg / (2 * n_fg + 1e-5), "dp_bg": dbg / (2 * n_bg + 1e-5)}
    expected["pos"] = expected["bg_pos"] / 2 + expected["fg_pos"] / 2
    expected["total"] = (expected["pos"] + expected["neg"]) / 2 + (expected["dp_fg"] + expected["dp_bg"]) / 2
    for k, v in expected.items():
        assert abs(out[k].item() - v) < 1e-10, k


# ------------------------------------------------------------------------------------ dataset, step

def _ir_labels(voc, ids, folder, seed=0):
    """IR labels from the ground truth with a band of 'unsure' (255) pixels."""
    rng = np.random.default_rng(seed)
    for img_id in ids:
        label = voc["gt"][img_id].copy()
        label[rng.random(label.shape) < 0.1] = 255
        save_png(os.path.join(folder, img_id + ".png"), label)


def test_affinity_dataset(tmp_path):
    from fakevoc import make_fake_voc
    from voc12.affinity import VOC12AffinityDataset
    voc = make_fake_voc(tmp_path / "VOC2012", n_train=2, n_val=1, sizes=[(70, 52)], seed=3)
    _ir_labels(voc, voc["train"], str(tmp_path / "ir"))
    index = indexing.PathIndex(5, (16, 16))
    ds = VOC12AffinityDataset("train", label_dir=str(tmp_path / "ir"), crop_size=64, voc12_root=voc["root"],
                              indices_from=index.src_indices, indices_to=index.dst_indices,
                              rescale=(0.5, 1.5), hor_flip=True, crop_method="random")
    np.random.seed(0)
    out = ds[0]
    assert out["img"].shape == (3, 64, 64) and out["label"].shape == (64, 64)
    reduced = out["reduced_label"]
    assert reduced.shape == (16, 16)
    assert np.array_equal(reduced, imutils.rescale(out["label"], 0.25, 0))
    expected = indexing.affinity_labels(reduced, index.src_indices, index.dst_indices)
    for key, arr in zip(("aff_bg_pos_label", "aff_fg_pos_label", "aff_neg_label"), expected):
        assert out[key].shape == (len(index.search_dst), len(index.src_indices))
        assert np.array_equal(out[key].numpy(), arr)
    assert out["aff_bg_pos_label"].sum() > 0 and out["aff_neg_label"].sum() + out["aff_fg_pos_label"].sum() > 0


def _train_args(tmp_path, voc, **kw):
    args = dict(voc12_root=voc["root"], train_list="train_aug", infer_list="train",
                ir_label_out_dir=str(tmp_path / "ir"), irn_crop_size=64, irn_batch_size=2, irn_num_epoches=1,
                irn_learning_rate=0.1, irn_weight_decay=1e-4, irn_radius=5, train_amp="none",
                irn_weights_name=str(tmp_path / "sess" / "irn.pth"), pretrained="none", backbone="resnet50",
                backbone_width=WIDTH,
                cam_weights_name=str(tmp_path / "cam.pth"), device="cpu", num_workers=0, real_momentum=None, seed=0)
    args.update(kw)
    return argparse.Namespace(**args)


def test_train_irn_end_to_end(tmp_path):
    from fakevoc import make_fake_voc
    from voc12.dataloader import VOC12ImageDataset
    voc = make_fake_voc(tmp_path / "VOC2012", n_train=4, n_val=1, n_aug_only=1, sizes=[(64, 64), (50, 70)], seed=4)
    args = _train_args(tmp_path, voc)
    _ir_labels(voc, voc["train"] + voc["aug_only"], args.ir_label_out_dir)
    cam = _randomise(resnet50_cam.Net(pretrained="none", width=WIDTH, frozen_bn=False), seed=1)
    save_torch(args.cam_weights_name, cam.state_dict())

    torch.manual_seed(0)
    np.random.seed(0)
    train_irn.run(args)
    assert os.path.isfile(args.irn_weights_name)

    torch.manual_seed(0)
    initial = irn.new_training_module(indexing.PathIndex(5, (16, 16)), args.backbone, args.backbone_width,
                                      args.pretrained, args.cam_weights_name).state_dict()
    trained = torch.load(args.irn_weights_name, weights_only=True)
    assert set(trained) == set(initial)
    for k, v in initial.items():
        if k.startswith("resnet50."):
            assert torch.equal(trained[k], v), k          # the backbone is the classifier's, frozen
        elif k.endswith("0.weight") and k.startswith(("fc_edge", "fc_dp")):
            assert not torch.equal(trained[k], v), k      # the heads learnt
    # the mean-shift vector is the mean over whole batches of the infer list's mean displacement
    model = irn.Net(backbone_width=WIDTH)
    irn.load_irn_state(model, args.irn_weights_name)
    saved_mean = model.mean_shift.running_mean.clone()
    model.mean_shift.running_mean.zero_()
    model.eval()
    ds = VOC12ImageDataset("train", voc["root"], crop_size=64, crop_method="top_left")
    batches = [torch.stack([torch.from_numpy(ds[i]["img"]) for i in range(j, j + 2)]) for j in (0, 2)]
    with torch.no_grad():
        means = [model(b)[1].mean(dim=(0, 2, 3)) for b in batches]
    assert saved_mean.abs().sum() > 0
    assert torch.allclose(saved_mean, torch.stack(means).mean(0), atol=1e-5)
    # loadable for inference
    infer = irn.load_edge_displacement(args.irn_weights_name, "resnet50", WIDTH, 64, "cpu")
    assert torch.equal(infer.mean_shift.running_mean, saved_mean)

    # skipped when the weights exist
    os.utime(args.irn_weights_name, (1, 1))
    train_irn.run(args)
    assert os.stat(args.irn_weights_name).st_mtime == 1


def test_train_irn_input_errors(tmp_path):
    from fakevoc import make_fake_voc
    voc = make_fake_voc(tmp_path / "VOC2012", n_train=2, n_val=1, n_aug_only=1, seed=5)
    args = _train_args(tmp_path, voc, irn_crop_size=60)
    with pytest.raises(InputError, match="multiple of 16"):
        train_irn.run(args)
    with pytest.raises(InputError, match="--irn_radius 10 leaves no source pixel"):
        train_irn.run(_train_args(tmp_path, voc, irn_radius=10))
    args = _train_args(tmp_path, voc)
    _ir_labels(voc, voc["train"], args.ir_label_out_dir)  # aug-only id has no IR label
    with pytest.raises(InputError, match=f"1 of the 3 IR labels.*{voc['aug_only'][0]}.png.*--infer_list train_aug"):
        train_irn.run(args)
    _ir_labels(voc, voc["aug_only"], args.ir_label_out_dir)
    with pytest.raises(InputError, match="fewer than one batch"):
        train_irn.run(_train_args(tmp_path, voc, irn_batch_size=4))
    assert not os.path.exists(args.irn_weights_name)
