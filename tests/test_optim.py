import os

import pytest
import torch

from misc.torchutils import PolyOptimizer, gap2d, make_poly_optimizer


def test_gap2d():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float64).view(2, 3, 4, 5)
    assert torch.allclose(gap2d(x), x.mean(dim=(2, 3)))
    assert gap2d(x, keepdims=True).shape == (2, 3, 1, 1)


def _lrs_used(opt, n_steps, param):
    """The lr of every group during each of n_steps steps."""
    used = []
    for _ in range(n_steps):
        param.grad = torch.zeros_like(param)
        opt.step()
        used.append([g["lr"] for g in opt.param_groups])
    return used


def test_poly_schedule_values():
    p = torch.nn.Parameter(torch.zeros(3))
    q = torch.nn.Parameter(torch.zeros(2))
    opt = make_poly_optimizer([([p], 1), ([q], 10)], lr=0.1, weight_decay=1e-4, max_step=10)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 1.0]
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 1e-4]
    used = _lrs_used(opt, 13, p)
    for t in range(10):
        factor = (1 - t / 10) ** 0.9
        assert used[t] == pytest.approx([0.1 * factor, 1.0 * factor], rel=1e-12)
    assert used[0] == [0.1, 1.0]                       # t = 0: the initial lr
    assert used[5] == pytest.approx([0.1 * 0.5 ** 0.9, 0.5 ** 0.9])
    # t >= max_step: no more updates, the last lr stays
    assert used[10] == used[11] == used[12] == used[9]
    assert opt.global_step == 13


def _hand_sgd(p0, grads, lrs, wd, momentum):
    """torch SGD maths by hand: d = g + wd p; buf = d (first) or momentum buf + d; p -= lr buf."""
    p, buf, out = p0.clone(), None, []
    for g, lr in zip(grads, lrs):
        d = g + wd * p
        buf = d.clone() if buf is None else momentum * buf + d
        p = p - lr * buf
        out.append(p.clone())
    return out


@pytest.mark.parametrize("real_momentum, expected_momentum", [(None, 1e-4), (0.9, 0.9)])
def test_momentum_quirk_and_real_momentum(real_momentum, expected_momentum):
    torch.manual_seed(0)
    p0 = torch.randn(5, dtype=torch.float64)
    grads = [torch.randn(5, dtype=torch.float64) for _ in range(4)]
    p = torch.nn.Parameter(p0.clone())
    wd, lr, max_step = 1e-4, 0.5, 4
    opt = make_poly_optimizer([([p], 1)], lr=lr, weight_decay=wd, max_step=max_step, real_momentum=real_momentum)
    assert opt.param_groups[0]["momentum"] == expected_momentum
    got = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        got.append(p.detach().clone())
    lrs = [lr * (1 - t / max_step) ** 0.9 for t in range(max_step)]
    want = _hand_sgd(p0, grads, lrs, wd, expected_momentum)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    # the two momenta give visibly different trajectories (the test can tell them apart)
    other = _hand_sgd(p0, grads, lrs, wd, 0.9 if real_momentum is None else 1e-4)
    assert not torch.allclose(got[-1], other[-1], atol=1e-6)


def test_poly_optimizer_direct_constructor_is_the_original_call():
    # PolyOptimizer(groups, lr, weight_decay, max_step): weight decay lands in SGD's momentum slot
    p = torch.nn.Parameter(torch.zeros(1))
    opt = PolyOptimizer([{"params": [p], "lr": 0.3, "weight_decay": 5e-4}], lr=0.3, weight_decay=5e-4, max_step=2)
    assert opt.param_groups[0]["momentum"] == 5e-4 and opt.param_groups[0]["weight_decay"] == 5e-4
    assert opt.initial_lrs == [0.3]


# ----------------------------------------------------------------- --deterministic's replacements (CUDA only)

def test_the_deterministic_bilinear_and_cross_entropy_equal_pytorchs(monkeypatch):
    from misc import torchutils
    monkeypatch.setattr(torchutils, "_deterministic_cuda", lambda x: True)  # take the replacement on the CPU
    torch.manual_seed(0)
    x = torch.randn(2, 3, 13, 17, dtype=torch.float64, requires_grad=True)
    for kwargs in ({"scale_factor": 0.5}, {"scale_factor": 0.75}, {"scale_factor": 4}, {"size": (29, 11)}):
        ours = torchutils.bilinear(x, **kwargs)
        theirs = torch.nn.functional.interpolate(x, mode="bilinear", align_corners=False, **kwargs)
        assert ours.shape == theirs.shape, kwargs
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(ours)
        grad_ours, = torch.autograd.grad(ours, x, g)
        grad_theirs, = torch.autograd.grad(theirs, x, g)
        torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-12, atol=1e-12)
    logits = torch.randn(2, 5, 4, 6, dtype=torch.float64)
    target = torch.randint(0, 5, (2, 4, 6))
    target[0, 0, :3] = 255
    for reduction in ("mean", "sum"):
        torch.testing.assert_close(torchutils.cross_entropy(logits, target, 255, reduction),
                                   torch.nn.functional.cross_entropy(logits, target, ignore_index=255,
                                                                     reduction=reduction))
    with pytest.raises(ValueError, match="reduction"):  # 'none' would otherwise come back as a mean
        torchutils.cross_entropy(logits, target, 255, "none")


def test_deterministic_mode_is_switched_on_and_off():
    from misc import torchutils
    try:
        torchutils.use_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torchutils.use_deterministic(False)
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
