"""Optimizer and small tensor helpers shared by the training steps (docs/method.md §3), as IRN's misc/torchutils.py.

The original `PolyOptimizer.__init__(params, lr, weight_decay, max_step)` calls
`torch.optim.SGD.__init__(params, lr, weight_decay)`, whose third positional slot is *momentum*: every
group runs with momentum = weight decay (1e-4), and each group's own "weight_decay" entry gives the
real decay. We reproduce that by default; `momentum=` (the driver's --real_momentum) sets a real
momentum instead (README "Deviations").
"""
import contextlib
import os
import warnings

import torch
import torch.nn.functional as F

from misc.utils import InputError

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


_OPTIONAL_SUFFIX = ".num_batches_tracked"  # absent from checkpoints of old PyTorch; unused by the nets
_MAX_LISTED = 8


def train_only(model, groups):
    """Let only the parameters of `groups` (lists of parameters) require gradients; returns `groups`.

    A parameter no optimizer updates then costs no backward pass: the released training steps compute and
    discard such gradients. The gradients of the trained parameters do not change, nor those of inputs
    that require them (W-OoD's anti-adversarial step)."""
    trained = {id(p) for group in groups for p in group}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained)
    return groups


def listed_keys(keys):
    keys = sorted(keys)
    more = f" ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def load_canonical_state(model, merged, origin, source, network, width):
    """Strictly load `merged` (a state dict already mapped to our names; `origin` maps each name to the
    checkpoint's key) into `model`, or raise InputError naming `source` and the missing / unexpected /
    mis-shaped keys. `network` and `width` only word the message."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in merged and not k.endswith(_OPTIONAL_SUFFIX)]
    unexpected = [origin[k] for k in merged if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {listed_keys(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {listed_keys(unexpected)}")
        raise InputError(f"{source} is not {network} state dict ({'; '.join(parts)}); the file is "
                         f"truncated or belongs to another network")
    wrong = [f"{origin[k]} {tuple(merged[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in merged and merged[k].shape != v.shape]
    if wrong:
        raise InputError(f"{source}: {len(wrong)} tensor(s) of the wrong shape, e.g. {'; '.join(wrong[:3])}; "
                         f"was it trained with another --backbone_width (now {width})?")
    for k, v in expected.items():
        if k not in merged:  # only optional counters reach here
            merged[k] = v
    model.load_state_dict(merged, strict=True)
    return model


def frozen_cpu_graph(model, example):
    """`model` (eval mode) traced on `example` and frozen as a TorchScript graph for CPU inference:
    BatchNorm folded into the convolutions, conv + ReLU / add fused, oneDNN-prepacked weights. The same
    maths up to float rounding (a few 1e-7 of the largest value), and faster on small CPU nets because
    fewer passes over memory: bench/make_cam.py measures it.

    Returns None, with a note, if this PyTorch cannot trace or freeze the model (TorchScript is
    deprecated upstream); the caller then keeps the eager model. Sizes are not fixed by the trace:
    every image size runs through the same graph.
    """
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TorchScript's deprecation and tracer notes, once per process
            # check_trace re-traces to compare (0.8 s of 1 s here); tests/test_make_cam.py checks the graph
            traced = torch.jit.trace(model.eval(), example, check_trace=False)
            graph = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
            graph(example)  # the first call optimises; fail here, not on the first image
        return graph
    except Exception as e:  # an optional speed-up: never a reason to stop the step
        print(f"note: cannot freeze the model as a TorchScript graph ({type(e).__name__}: {e}); running it eagerly")
        return None


class TrainingDiverged(InputError):
    """A training step met a non-finite loss, gradient or weight: the driver prints the one line (exit 2);
    nothing of the step is saved."""


def require_finite(step_name, epoch, iteration, flags, loss=None, parameters=None, state_dict=None):
    """Raise TrainingDiverged unless the loss, the gradients of `parameters` and the tensors of
    `state_dict` (whichever are given) are all finite.

    `epoch` and `iteration` are 1-based and only word the message, as `flags` does: a dict of the flags
    most likely at fault (e.g. {"--cam_learning_rate": 0.1}). One call per iteration costs one device
    synchronisation (the loss is read anyway for the progress bar)."""
    what = None
    if loss is not None and not torch.isfinite(loss.detach()).all():
        what = f"the loss is {loss.detach().flatten()[0].item()}"
    if what is None and parameters is not None:
        grads = [p.grad for p in parameters if p.grad is not None]
        if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
            what = "a gradient is not finite"
    if what is None and state_dict is not None:
        bad = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            what = f"{len(bad)} weight tensor(s) are not finite (e.g. {bad[0]})"
    if what is None:
        return
    where = f"epoch {epoch} iteration {iteration}" if iteration is not None else f"after epoch {epoch}"
    suspects = ", ".join(f"{flag} {value:g}" for flag, value in flags.items())
    raise TrainingDiverged(f"{step_name} diverged: {what} at {where}; nothing was saved. Lower {suspects} "
                           f"(or check the images of the training list) and run the step again")


def precision_context(device, amp):
    """Autocast to bfloat16 for `amp` "bf16" (--amp for make_cam / make_advcam, --train_amp for the training steps:
    the forward passes; losses and what follows stay float32), else nothing."""
    if amp in (None, "none"):
        return contextlib.nullcontext()
    if amp != "bf16":
        raise ValueError(f"amp must be 'none' or 'bf16', got {amp!r}")
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


# ------------------------------------------------------------------------ deterministic CUDA (--deterministic)

def use_deterministic(enabled):
    """--deterministic: deterministic algorithms everywhere (an op without one raises), cuDNN's deterministic
    convolutions without autotuning, and cuBLAS's fixed workspace (the variable must be set before cuBLAS
    starts: the driver calls this first). The two ops of this pipeline that have no deterministic CUDA backward,
    bilinear up-sampling and the NLL loss, are replaced in that mode by `bilinear` and `cross_entropy`."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = False


def _deterministic_cuda(x):
    return x.is_cuda and torch.are_deterministic_algorithms_enabled()


def bilinear_matrix(n_in, n_out, scale, device, dtype):
    """(n_out, n_in) weights of PyTorch's bilinear resize along one axis (align_corners=False): output d reads
    source (d + 0.5) * scale - 0.5 (at least 0), split between its floor and the next index."""
    src = ((torch.arange(n_out, device=device, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0)
    low = src.floor().long().clamp(max=n_in - 1)
    high = (low + 1).clamp(max=n_in - 1)
    frac = (src - low).to(dtype)
    rows = torch.arange(n_out, device=device)
    weights = torch.zeros(n_out, n_in, device=device, dtype=dtype)
    weights.index_put_((rows, low), 1 - frac, accumulate=True)
    weights.index_put_((rows, high), frac, accumulate=True)
    return weights


def bilinear(x, size=None, scale_factor=None):
    """F.interpolate(x, size or scale_factor, mode="bilinear", align_corners=False). Under --deterministic on
    CUDA, where PyTorch's backward of it has no deterministic algorithm, the same resize as two matrix products
    (equal up to float rounding; their backward is deterministic)."""
    if not _deterministic_cuda(x):
        return F.interpolate(x, size=size, scale_factor=scale_factor, mode="bilinear", align_corners=False)
    height, width = x.shape[-2:]
    if size is None:  # as F.interpolate: the output size floors, the sampling uses the given factor
        size = (int(height * scale_factor), int(width * scale_factor))
        scales = (1 / scale_factor, 1 / scale_factor)
    else:
        scales = (height / size[0], width / size[1])
    rows = bilinear_matrix(height, size[0], scales[0], x.device, x.dtype)
    cols = bilinear_matrix(width, size[1], scales[1], x.device, x.dtype)
    return torch.matmul(torch.matmul(rows, x), cols.t())


class Bilinear(torch.nn.Module):
    """nn.Upsample(scale_factor, mode="bilinear") through `bilinear` (no parameters: state dicts unchanged)."""

    def __init__(self, scale_factor):
        super().__init__()
        self.scale_factor = scale_factor

    def forward(self, x):
        return bilinear(x, scale_factor=self.scale_factor)


def cross_entropy(logits, target, ignore_index, reduction="mean"):
    """F.cross_entropy(logits, target, ignore_index=..., reduction=...) over (B, C, H, W) logits. Under
    --deterministic on CUDA, where the NLL loss has no deterministic algorithm, as -log_softmax gathered at the
    targets (the same value up to float rounding; gather's backward is deterministic there)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not _deterministic_cuda(logits):
        return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)
    valid = target != ignore_index
    picked = F.log_softmax(logits, dim=1).gather(1, torch.where(valid, target, 0)[:, None])[:, 0]
    total = -(picked * valid).sum()
    return total if reduction == "sum" else total / valid.sum()
