"""wood/losses.py against literal computations (python loops over entries) on small tensors, and the
training step that combines them (step/train_wood.py) on a tiny fake VOC."""
import argparse
import math
import os

import numpy as np
import pytest
import torch

import run_sample
from fakevoc import make_fake_voc, make_ood_pool, wood_constants
from misc.torchutils import TrainingDiverged, train_only
from misc.utils import InputError, load_torch, save_torch
from net.resnet50_cam import Net
from step import train_wood
from step.train_wood import selection_due
from wood.losses import (
    anti_adversarial_ood_step,
    classification_loss,
    distance_loss,
    ood_distance_threshold,
    ood_negative_loss,
    prototype_distances,
    wood_loss,
)

torch.set_num_threads(1)  # the test machine's 2 cores are shared: more threads only contend


def test_prototype_distances_are_euclidean_not_squared():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(3, 5, generator=g, dtype=torch.float64)
    P = torch.randn(7, 5, generator=g, dtype=torch.float64)
    got = prototype_distances(f, P)
    assert got.shape == (3, 7)
    for b in range(3):
        for j in range(7):
            assert got[b, j].item() == pytest.approx(math.sqrt(sum((f[b, i].item() - P[j, i].item()) ** 2
                                                                   for i in range(5))), rel=1e-12)
    assert prototype_distances(torch.tensor([[3.0, 4.0]]), torch.zeros(1, 2)).item() == 5.0


def test_prototype_distances_gradient_finite_at_zero_distance():
    f = torch.tensor([[1.0, 2.0]], requires_grad=True)
    P = torch.tensor([[1.0, 2.0], [4.0, 6.0]])
    prototype_distances(f, P).sum().backward()
    assert torch.allclose(f.grad, torch.tensor([[-0.6, -0.8]]))  # only the non-zero distance pulls


def literal_distance_loss(D, y, C, K, tau):
    B = len(D)
    fg_total = 0.0
    for b in range(B):
        for c in range(C):
            fg_total += D[b][c] * y[b][c]
    nonzero = [D[b][C + j] for b in range(B) for j in range(K) if D[b][C + j] != 0]
    k = int(len(nonzero) * (1 - tau))
    thr = sorted(nonzero, reverse=True)[k - 1]  # the k-th largest
    sel_total = 0.0
    for b in range(B):
        for j in range(K):
            if D[b][C + j] < thr:
                sel_total += D[b][C + j]
    return fg_total / (B * C) * (C / K) - sel_total / (B * K), thr


@pytest.mark.parametrize("seed", [0, 1])
def test_distance_loss_random(seed):
    g = torch.Generator().manual_seed(seed)
    B, C, K = 4, 5, 3
    D = torch.rand(B, C + K, generator=g, dtype=torch.float64) * 3
    y = (torch.rand(B, C, generator=g) < 0.4).double()
    y[0] = 0
    y[0, 1] = y[0, 3] = 1  # an image with two classes
    y[:, 4] = 0            # a class with no image
    expected, thr = literal_distance_loss(D.tolist(), y.tolist(), C, K, 0.2)
    assert ood_distance_threshold(D[:, C:], 0.2).item() == thr
    assert distance_loss(D, y, C, K, 0.2).item() == pytest.approx(expected, rel=1e-12)


def test_distance_loss_ties_and_zeros_in_the_top_tau_selection():
    C, K = 2, 4
    Do = torch.tensor([[5.0, 3.0, 3.0, 0.0],
                       [3.0, 1.0, 0.0, 2.0]], dtype=torch.float64)
    # non-zero: 5 3 3 3 1 2 -> n = 6, k = int(6 * 0.8) = 4, 4th largest = 3 (tied three times);
    # selected: the entries < 3 (1 and 2, zeros add nothing), ties at 3 are not selected
    D = torch.cat([torch.tensor([[1.0, 2.0], [4.0, 8.0]], dtype=torch.float64), Do], dim=1)
    y = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    assert ood_distance_threshold(Do, 0.2).item() == 3.0
    expected = (1 + 2 + 8) / 4 * (C / K) - (1 + 2) / 8
    assert distance_loss(D, y, C, K, 0.2).item() == pytest.approx(expected, rel=1e-12)
    assert distance_loss(D, y, C, K, 0.2).item() == pytest.approx(literal_distance_loss(D.tolist(), y.tolist(),
                                                                                         C, K, 0.2)[0])


def test_distance_loss_gradient_signs():
    C, K = 2, 3
    D = torch.tensor([[1.0, 2.0, 0.5, 4.0, 6.0], [3.0, 1.0, 5.0, 0.7, 8.0]], requires_grad=True)
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    distance_loss(D, y, C, K, 0.2).backward()
    # own-class distances pulled (positive gradient (1/(B*C)) * C/K), other classes untouched;
    # selected OoD distances (< thr = 4.0, the 4th largest of 6) pushed (negative gradient 1/(B*K))
    expected = torch.tensor([[1 / 4 * 2 / 3, 0, -1 / 6, 0, 0], [0, 1 / 4 * 2 / 3, 0, -1 / 6, 0]])
    assert torch.allclose(D.grad, expected)


def test_distance_threshold_with_k_zero_selects_nothing():
    Do = torch.tensor([[0.0, 2.0]])  # one non-zero entry: k = int(1 * 0.8) = 0
    assert ood_distance_threshold(Do, 0.2).item() == float("-inf")
    D = torch.tensor([[1.0, 0.0, 2.0]])
    assert distance_loss(D, torch.tensor([[1.0]]), 1, 2, 0.2).item() == pytest.approx(1.0 * 1 / 2)


class MeanLinear(torch.nn.Module):
    """logits = mean over pixels of x (B, 3) @ W.T: the input gradient is known in closed form."""

    def __init__(self, W):
        super().__init__()
        self.W = torch.nn.Parameter(W)

    def forward(self, x):
        return x.mean(dim=(2, 3)) @ self.W.t()


def test_anti_adversarial_ood_step_literal():
    g = torch.Generator().manual_seed(0)
    W = torch.tensor([[1.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 1.0], [-1.0, -1.0, -1.0]], dtype=torch.float64)
    model = MeanLinear(W)
    # images whose top classes differ (1, 0, 2): gradients of different sizes, so the batch-wide max matters
    means = torch.tensor([[0.0, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 3.0]], dtype=torch.float64)
    o = means[:, :, None, None] + 0.3 * torch.randn(3, 3, 2, 2, generator=g, dtype=torch.float64)
    step = 0.07
    got = anti_adversarial_ood_step(model, o, step)
    assert not got.requires_grad and model.W.grad is None  # no gradient left on the parameters
    logits = (o.mean(dim=(2, 3)) @ W.t()).tolist()
    grads = []
    for b in range(3):
        top = max(range(4), key=lambda c: (logits[b][c], -c))
        grads.append([[[W[top, ch].item() / 4 for _ in range(2)] for _ in range(2)] for ch in range(3)])
    gmax = max(abs(v) for img in grads for ch in img for row in ch for v in row)
    lo, hi = o.min().item(), o.max().item()
    for b in range(3):
        for ch in range(3):
            for i in range(2):
                for j in range(2):
                    moved = o[b, ch, i, j].item() + step * grads[b][ch][i][j] / (gmax + 1e-12)
                    assert got[b, ch, i, j].item() == pytest.approx(min(max(moved, lo), hi), rel=1e-12)
    assert (got != o).any() and got.min() >= lo and got.max() <= hi
    assert [max(range(4), key=lambda c: logits[b][c]) for b in range(3)] == [1, 0, 2]
    assert (got - o).abs().max().item() == pytest.approx(step)  # image 0's channel 1: the largest gradient
    assert (got[1, 0] - o[1, 0]).abs().max().item() == pytest.approx(step / 5)  # 1/5 of it, not its own max


def test_ood_negative_loss_literal_with_masked_class_and_tie():
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0, 1.0, -2.0],    # argmax 2: kept
                           [0.0, 0.0, 1.0, 0.0, 3.0, 0.0],      # argmax 4: masked out
                           [-1.0, 0.0, 1.5, 0.0, 1.5, 0.2]],    # tie 2 / 4: first (2) wins, kept
                          dtype=torch.float64)
    expected = 0.0
    for b in (0, 2):
        expected += sum(-math.log(1 - 1 / (1 + math.exp(-v))) for v in logits[b].tolist()) / 6
    got = ood_negative_loss(logits, mask_class=4, id_batch_size=16)
    assert got.item() == pytest.approx(expected / 16, rel=1e-12)
    unmasked = ood_negative_loss(logits, mask_class=-1, id_batch_size=2).item()
    row1 = sum(-math.log(1 - 1 / (1 + math.exp(-v))) for v in logits[1].tolist()) / 6
    assert unmasked == pytest.approx((expected + row1) / 2, rel=1e-12)


def test_classification_loss_is_mean_bce():
    logits = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]], dtype=torch.float64)
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    expected = 0.0
    for b in range(2):
        for c in range(3):
            p = 1 / (1 + math.exp(-logits[b, c].item()))
            expected -= math.log(p) if y[b, c] else math.log(1 - p)
    assert classification_loss(logits, y).item() == pytest.approx(expected / 6, rel=1e-12)


# ------------------------------------------------------------------ the training step (step/train_wood.py)

def test_selection_due_last_quarter_of_last_epoch():
    due = [(e, s) for e in range(2) for s in range(661) if selection_due(e, s, 2, 661, 10)]
    assert due == [(1, s) for s in range(500, 661, 10)]  # 0-based steps > 495.75, multiples of 10
    assert not any(selection_due(1, s, 2, 40, 10) for s in range(40))  # 31..39: no multiple of 10


def test_wood_loss_composition():
    torch.manual_seed(0)
    model = Net(width=8, frozen_bn=True, detach_stage2=False).double()
    with torch.no_grad():
        model.classifier.weight.mul_(0.01)
    img, ood = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.randn(3, 3, 32, 32, dtype=torch.float64)
    label = torch.zeros(2, 20, dtype=torch.float64)
    label[0, 1] = label[1, 1] = label[1, 5] = 1
    P = torch.randn(20 + 4, 256, dtype=torch.float64)
    args = argparse.Namespace(ood_dist_topk=0.2, ood_adv_step=0.07, ood_mask_class=4, distance_lambda=0.007,
                              ood_coeff=0.25)
    loss, parts = wood_loss(model, img, label, ood, P, wood_constants(args))
    logits = model(img)
    feat = model.stage4_features(img).mean(dim=(2, 3))
    D = torch.stack([torch.stack([((feat[b] - P[j]) ** 2).sum().sqrt() for j in range(24)]) for b in range(2)])
    ood_adv = anti_adversarial_ood_step(model, ood, 0.07)
    expected = (torch.nn.functional.multilabel_soft_margin_loss(logits, label)
                + 0.007 * distance_loss(D, label, 20, 4, 0.2) + 0.25 * ood_negative_loss(model(ood_adv), 4, 2))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    assert parts["dist"] == pytest.approx(distance_loss(D, label, 20, 4, 0.2).item(), rel=1e-10)
    loss.backward()
    assert model.classifier.weight.grad is not None


@pytest.fixture
def wood_setup(tmp_path):
    make_fake_voc(tmp_path / "VOC2012", n_train=4, n_val=2, size=64, seed=0)
    make_ood_pool(tmp_path / "ood", 5, tmp_path / "ood_list.txt")
    torch.manual_seed(0)
    save_torch(str(tmp_path / "cam.pth"), Net(width=8).state_dict())
    args = run_sample.parse_args([
        "--preset", "toy", "--voc12_root", str(tmp_path / "VOC2012"), "--work_dir", str(tmp_path / "work"),
        "--device", "cpu", "--num_workers", "0", "--backbone_width", "8",
        "--cam_weights_name", str(tmp_path / "cam.pth"), "--ood_root", str(tmp_path / "ood"),
        "--ood_list", str(tmp_path / "ood_list.txt"), "--wood_batch_size", "1", "--ood_batch_size", "2",
        "--wood_num_epoches", "1", "--wood_learning_rate", "0.001", "--cluster_K", "3",
        "--cam_resize_long", "48", "64", "--cam_crop_size", "64", "--ood_long_side", "64",
        "--select_scales", "1.0", "0.5", "--select_eval_thres", "0.1", "0.3", "--select_every", "1",
        "--wood_weights_name", str(tmp_path / "wood.pth")])
    return args


def test_train_only_leaves_the_trained_gradients_unchanged():
    """train_wood lets only stage3, stage4 and the classifier require gradients: their gradients are the
    full backward pass's (bit for bit), stage1 and stage2 get none, and the images still get theirs."""
    grads = {}
    for frozen in (False, True):
        torch.manual_seed(0)
        model = Net(width=8, frozen_bn=True, detach_stage2=False)
        groups = train_only(model, model.wood_param_groups()) if frozen else model.wood_param_groups()
        torch.manual_seed(1)
        img, ood = torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)
        label = torch.zeros(2, 20)
        label[0, 1] = label[1, 5] = 1
        args = argparse.Namespace(ood_dist_topk=0.2, ood_adv_step=0.07, ood_mask_class=4, distance_lambda=0.007,
                                  ood_coeff=8.0)
        loss, _ = wood_loss(model, img, label, ood, torch.randn(24, 256), wood_constants(args))
        loss.backward()
        named = dict(model.named_parameters())
        grads[frozen] = {n: p.grad for n, p in named.items()}
        if frozen:
            trained = {id(p) for group in groups for p in group}
            assert all(p.requires_grad == (id(p) in trained) for p in model.parameters())
        x = img.clone().requires_grad_(True)
        grads[frozen]["image"] = torch.autograd.grad(model(x).sum(), x)[0]
    trained_names = [n for n in grads[False] if n.startswith(("stage3.", "stage4.", "classifier.")) or n == "image"]
    assert len(trained_names) > 3
    for n in trained_names:
        assert torch.equal(grads[True][n], grads[False][n]), n
    assert grads[False]["stage2.0.0.conv1.weight"] is not None          # the released code computes them
    assert all(g is None for n, g in grads[True].items() if n.startswith(("stage1.", "stage2.")))


@pytest.mark.filterwarnings("ignore:no image of class")  # fake VOC has 3 of the 20 classes
def test_train_wood_trains_stages_3_4_and_classifier_and_selects(wood_setup, monkeypatch, capsys):
    args = wood_setup
    selectors = []
    original_init = train_wood.CheckpointSelector.__init__

    def spy_init(self, *a, **k):
        original_init(self, *a, **k)
        selectors.append(self)
    monkeypatch.setattr(train_wood.CheckpointSelector, "__init__", spy_init)
    updates_at_offer = []   # optimizer steps taken when each evaluation starts
    original_offer, original_step = train_wood.CheckpointSelector.offer, train_wood.make_poly_optimizer
    steps = [0]

    def spy_offer(self, model, tag):
        updates_at_offer.append(steps[0])
        return original_offer(self, model, tag)

    def counting_optimizer(*a, **k):
        opt = original_step(*a, **k)
        step = opt.step

        def counted(*sa, **sk):
            steps[0] += 1
            return step(*sa, **sk)
        opt.step = counted
        return opt
    monkeypatch.setattr(train_wood.CheckpointSelector, "offer", spy_offer)
    monkeypatch.setattr(train_wood, "make_poly_optimizer", counting_optimizer)
    train_wood.run(args)
    start, saved = load_torch(args.cam_weights_name), load_torch(args.wood_weights_name)
    assert saved.keys() == start.keys() and all(torch.isfinite(v).all() for v in saved.values())
    for key in start:
        changed = not torch.equal(start[key], saved[key])
        trainable = key.startswith(("stage3.", "stage4.", "classifier.")) and "running_" not in key \
            and "num_batches" not in key
        assert changed == trainable, key
    # 6 steps of 1 image: the last quarter is step 5 (> 4.5); plus once after training
    (selector,) = selectors
    assert [h[0] for h in selector.history] == ["epoch 1 step 5, before its update", "after training"]
    assert updates_at_offer == [5, 6]  # as released: step 5 is scored before its update (docs/method.md §4.3 (b))
    best = max(range(2), key=lambda i: (selector.history[i][1], -i))
    assert selector.best[2] == selector.history[best][0]
    assert all(torch.equal(saved[k], selector.best_state[k]) for k in saved)
    assert f"selected the weights of {selector.best[2]}" in capsys.readouterr().out
    proto = np.load(os.path.join(args.work_dir, "wood_prototypes.npz"))
    assert proto["id"].shape == (20, 256) and proto["ood"].shape == (3, 256)
    train_wood.run(args)  # the weights exist: skipped
    assert "exists; keeping it" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:no image of class")
def test_train_wood_selection_after_the_update_and_per_threshold(wood_setup, monkeypatch):
    args = wood_setup
    args.select_before_update, args.select_accumulate = False, False
    sweeps = []
    independent = train_wood.sweep_thresholds
    monkeypatch.setattr(train_wood, "sweep_thresholds",
                        lambda *a, **k: sweeps.append("independent") or independent(*a, **k))
    offers = []
    original_offer = train_wood.CheckpointSelector.offer
    monkeypatch.setattr(train_wood.CheckpointSelector, "offer",
                        lambda self, model, tag: offers.append(tag) or original_offer(self, model, tag))
    train_wood.run(args)
    assert offers == ["epoch 1 step 5, after its update", "after training"]
    assert sweeps == ["independent", "independent"]


@pytest.mark.filterwarnings("ignore:no image of class")
def test_train_wood_without_selection(wood_setup, monkeypatch):
    args = wood_setup
    args.select_by_gt = False
    monkeypatch.setattr(train_wood, "CheckpointSelector", None)  # never built
    train_wood.run(args)
    assert os.path.isfile(args.wood_weights_name)


def test_train_wood_bad_ood_input(wood_setup, tmp_path):
    args = wood_setup
    (tmp_path / "empty.txt").write_text("\n")
    args.ood_list = str(tmp_path / "empty.txt")
    with pytest.raises(InputError, match="is empty"):
        train_wood.run(args)
    args.ood_list = str(tmp_path / "none.txt")
    with pytest.raises(InputError, match="none.txt"):
        train_wood.run(args)
    args.ood_list = str(tmp_path / "ood_list.txt")
    args.cluster_K = 6
    with pytest.raises(InputError, match=r"fewer OoD images than K \(5 < 6\)"):
        train_wood.run(args)
    args.cluster_K, args.ood_batch_size = 3, 6
    with pytest.raises(InputError, match="fewer than one OoD batch"):
        train_wood.run(args)
    args.ood_batch_size = 2
    (tmp_path / "ood" / "o3.jpg").write_bytes(b"broken")
    with pytest.raises(InputError, match="cannot read image .*o3.jpg"):
        train_wood.run(args)
    assert not os.path.exists(args.wood_weights_name)


@pytest.mark.filterwarnings("ignore:no image of class")
def test_train_wood_that_diverges_stops_and_saves_nothing(wood_setup):
    args = wood_setup
    args.wood_learning_rate, args.ood_coeff = 1e12, 1e6   # the push-down's steps explode
    with pytest.raises(TrainingDiverged, match=r"train_wood diverged: .* at epoch 1 iteration \d+; nothing was "
                                               r"saved\. Lower .*--wood_learning_rate 1e\+12.*--ood_coeff 1e\+06"):
        train_wood.run(args)
    assert not os.path.exists(args.wood_weights_name)
    assert not os.path.exists(args.wood_weights_name + ".provenance.json")
