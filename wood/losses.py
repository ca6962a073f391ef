"""The W-OoD losses (docs/method.md §4.3), as pure functions of tensors.

`wood_loss` combines them for one training step:
    L = BCE_with_logits(logits, y) + distance_lambda * distance_loss(...) + ood_coeff * ood_negative_loss(...)
"""
import dataclasses

import torch
import torch.nn.functional as F

from misc import dist


def prototype_distances(features, prototypes):
    """(B, C+K) Euclidean (not squared) distances between features (B, D) and prototypes (C+K, D).

    Computed pair by pair (no |a|^2 + |b|^2 - 2ab shortcut, which loses precision); the gradient
    at a zero distance is 0.
    """
    return torch.cdist(features, prototypes.to(features.dtype), p=2.0,
                       compute_mode="donot_use_mm_for_euclid_dist")


def ood_distance_threshold(ood_distances, tau):
    """`thr` of docs/method.md §4.3 step 3: the k-th largest non-zero entry, k = int(n * (1 - tau)), n = their count.

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
    """L_dist = mean(fg) * (C / K) - mean(Do * [Do < thr]) (docs/method.md §4.3 steps 2-4).

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
    """One anti-adversarial step on an OoD batch (docs/method.md §4.3 step 5a), detached result.

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
    """L_ood (docs/method.md §4.3 step 5b): sum over the OoD images of multilabel_soft_margin_loss(logits_b, 0)
    (mean over the classes), images whose arg-max class is `mask_class` left out, divided by the ID
    batch size."""
    per_image = F.multilabel_soft_margin_loss(logits, torch.zeros_like(logits), reduction="none")  # (B,)
    keep = (logits.argmax(dim=1) != mask_class).to(per_image.dtype)
    return (per_image * keep).sum() / id_batch_size


def classification_loss(logits, labels):
    """BCE with logits, mean over all entries (= multilabel_soft_margin_loss with mean reduction)."""
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


# ------------------------------------------------------------------------ the W-OoD loss of one step

@dataclasses.dataclass(frozen=True)
class WoodConstants:
    """The constants of the W-OoD loss (docs/method.md §4.3)."""
    ood_adv_step: float      # the anti-adversarial step on the OoD batch
    ood_dist_topk: float     # tau: the fraction of OoD distances pushed
    ood_mask_class: int      # OoD images arg-maxed to this class are left out of the OoD loss
    distance_lambda: float   # weight of the distance loss
    ood_coeff: float         # weight of the OoD loss


def wood_terms(model, img, label, ood_img, prototypes, constants):
    """The three loss terms of docs/method.md §4.3 (unweighted tensors: "cls", "dist", "ood") for one ID batch
    and one OoD batch, and what they came from ("features": GAP(stage4) of the ID batch, "logits",
    "ood_logits": of the anti-adversarial OoD batch). `prototypes` is (C + K, D): the C class prototypes, then
    the K OoD ones."""
    n_classes = label.shape[1]
    logits, features = model.feature_list(img)
    distances = prototype_distances(features[-1], prototypes)
    # under torchrun img / ood_img are this rank's slices: the batch-wide statistics come from all ranks
    ood_logits = model(anti_adversarial_ood_step(model, ood_img, constants.ood_adv_step, dist.maximum,
                                                 dist.minimum))
    terms = {"cls": classification_loss(logits, label),
             "dist": distance_loss(distances, label, n_classes, prototypes.shape[0] - n_classes,
                                   constants.ood_dist_topk, whole_batch=dist.gather_rows),
             "ood": ood_negative_loss(ood_logits, constants.ood_mask_class, img.shape[0])}
    return terms, {"features": features[-1], "logits": logits, "ood_logits": ood_logits}


def weighted_terms(terms, constants):
    """Each term times its weight (docs/method.md §4.3 step 6): their sum is the loss."""
    return {"cls": terms["cls"], "dist": constants.distance_lambda * terms["dist"],
            "ood": constants.ood_coeff * terms["ood"]}


def wood_loss(model, img, label, ood_img, prototypes, constants):
    """The loss of docs/method.md §4.3 step 6 and its unweighted parts (floats)."""
    terms, _ = wood_terms(model, img, label, ood_img, prototypes, constants)
    loss = sum(weighted_terms(terms, constants).values())
    return loss, {k: v.item() for k, v in terms.items()}
