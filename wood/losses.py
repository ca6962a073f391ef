"""The W-OoD losses (SPEC 4.3, steps 1-5), as pure functions of tensors.

The training step (step/train_wood.py) combines them:
    L = BCE_with_logits(logits, y) + distance_lambda * distance_loss(...) + ood_coeff * ood_negative_loss(...)
"""
import torch
import torch.nn.functional as F


def prototype_distances(features, prototypes):
    """(B, C+K) Euclidean (not squared) distances between features (B, D) and prototypes (C+K, D).

    Computed pair by pair (no |a|^2 + |b|^2 - 2ab shortcut, which loses precision); the gradient
    at a zero distance is 0.
    """
    return torch.cdist(features, prototypes.to(features.dtype), p=2.0,
                       compute_mode="donot_use_mm_for_euclid_dist")


def ood_distance_threshold(ood_distances, tau):
    """`thr` of SPEC 4.3 step 3: the k-th largest non-zero entry, k = int(n * (1 - tau)), n = their count.

    Entries strictly below `thr` are "selected" (about the closest tau of the OoD distances). With
    k == 0 (n <= 1 at tau = 0.2; the original's top-k would fail) nothing is selected: -inf.
    """
    values = ood_distances.detach()
    nonzero = values[values != 0]
    k = int(nonzero.numel() * (1 - tau))
    if k == 0:
        return values.new_tensor(float("-inf"))
    return torch.topk(nonzero, k).values[-1]


def _whole(tensor):
    return tensor


def distance_loss(distances, labels, C, K, tau, whole_batch=_whole):
    """L_dist = mean(fg) * (C / K) - mean(Do * [Do < thr]) (SPEC 4.3 steps 2-4).

    distances: (B, C+K) from `prototype_distances`; labels: (B, C) multi-hot. Both means run over
    all entries of their matrices (B x C and B x K), zeros included. Minimising it pulls features to
    their own class prototypes and pushes them away from the closest OoD prototypes. `thr` is taken over
    `whole_batch(Do)`: the global batch's distances when the batch is split over processes (misc/dist.py).
    """
    fg = distances[:, :C] * labels.to(distances.dtype)
    ood = distances[:, C:C + K]
    thr = ood_distance_threshold(whole_batch(ood.detach()), tau)
    selected = ood * (ood < thr).to(ood.dtype)
    return fg.mean() * (C / K) - selected.mean()


def anti_adversarial_ood_step(model, images, step, batch_max=_whole, batch_min=_whole):
    """One anti-adversarial step on an OoD batch (SPEC 4.3 step 5a), detached result.

    s = sum_b max_c logits_b,c; g = ds/dimages; images + step * g / (max|g| + 1e-12), clamped to
    [min(images), max(images)], where max|g|, min and max run over the whole batch tensor
    (`batch_max` / `batch_min` take them over the global batch when it is split over processes).
    Only the input gradient is computed (torch.autograd.grad), so unlike the original's backward()
    it leaves no gradient on the parameters; the result is the same.
    """
    images = images.detach().requires_grad_(True)
    score = model(images).max(dim=1).values.sum()
    grad, = torch.autograd.grad(score, images)
    with torch.no_grad():
        moved = images + step * grad / (batch_max(grad.abs().max()) + 1e-12)
        return torch.clamp(moved, batch_min(images.min()), batch_max(images.max())).detach()


def ood_negative_loss(logits, mask_class, id_batch_size):
    """L_ood (SPEC 4.3 step 5b): sum over the OoD images of multilabel_soft_margin_loss(logits_b, 0)
    (mean over the classes), images whose arg-max class is `mask_class` left out, divided by the ID
    batch size."""
    per_image = F.multilabel_soft_margin_loss(logits, torch.zeros_like(logits), reduction="none")  # (B,)
    keep = (logits.argmax(dim=1) != mask_class).to(per_image.dtype)
    return (per_image * keep).sum() / id_batch_size


def classification_loss(logits, labels):
    """BCE with logits, mean over all entries (= multilabel_soft_margin_loss with mean reduction)."""
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
