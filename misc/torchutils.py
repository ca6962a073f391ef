"""Optimizer and small tensor helpers shared by the training steps (SPEC 3), as IRN's misc/torchutils.py.

The original `PolyOptimizer.__init__(params, lr, weight_decay, max_step)` calls
`torch.optim.SGD.__init__(params, lr, weight_decay)`, whose third positional slot is *momentum*: every
group runs with momentum = weight decay (1e-4), and each group's own "weight_decay" entry gives the
real decay. We reproduce that by default; `momentum=` (the driver's --real_momentum) sets a real
momentum instead (README "Deviations").
"""
import torch

POLY_POWER = 0.9


def gap2d(x, keepdims=False):
    """Global average pool over the spatial dims: (B, C, H, W) -> (B, C) or (B, C, 1, 1)."""
    out = torch.mean(x.view(x.size(0), x.size(1), -1), -1)
    return out.view(out.size(0), out.size(1), 1, 1) if keepdims else out


class PolyOptimizer(torch.optim.SGD):
    """SGD whose group lrs follow `initial_lr * (1 - t / max_step) ** 0.9`, set before step t < max_step.

    `params` are SGD param groups (dicts with their own "lr" and "weight_decay"). `momentum=None`
    reproduces the original quirk (momentum = `weight_decay`).
    """

    def __init__(self, params, lr, weight_decay, max_step, momentum=None, poly_power=POLY_POWER):
        super().__init__(params, lr=lr, momentum=weight_decay if momentum is None else momentum,
                         weight_decay=weight_decay)
        self.global_step = 0
        self.max_step = max_step
        self.poly_power = poly_power
        self.initial_lrs = [group["lr"] for group in self.param_groups]

    def poly_lr_multiplier(self, step):
        return (1 - step / self.max_step) ** self.poly_power

    def step(self, closure=None):
        if self.global_step < self.max_step:
            multiplier = self.poly_lr_multiplier(self.global_step)
            for group, initial_lr in zip(self.param_groups, self.initial_lrs):
                group["lr"] = initial_lr * multiplier
        loss = super().step(closure)
        self.global_step += 1
        return loss


def make_poly_optimizer(groups, lr, weight_decay, max_step, real_momentum=None):
    """PolyOptimizer over `groups` = [(params, lr multiplier), ...]; every group gets `weight_decay`.

    As the original: group i starts at lr * multiplier_i, momentum = weight_decay unless
    `real_momentum` is given.
    """
    param_groups = [{"params": list(params), "lr": multiplier * lr, "weight_decay": weight_decay}
                    for params, multiplier in groups]
    return PolyOptimizer(param_groups, lr=lr, weight_decay=weight_decay, max_step=max_step,
                         momentum=real_momentum)
