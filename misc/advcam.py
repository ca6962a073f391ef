"""AdvCAM maths (docs/method.md §4.6): anti-adversarial CAMs of a classifier, pure functions.

Per image, per label class c, per scale, starting from the unmodified MSF pair x = [img, flipped img]:
each iteration takes the Grad-CAM region of class c at stage4 (summed over the pair, the flipped half
flipped back), accumulates it, and moves x one normalised gradient step up
    L = L_cls - AD_coeff * L_AD,
    L_cls = sum_b mean relu(A)[b, c] - sum_{b, k != c} mean relu(A)[b, k],
    L_AD  = sum |region - region_0| * [region / max(region) > score_th],
x <- clamp(x + AD_stepsize * g / (max|g| + 1e-12), min(x), max(x)).
The accumulated regions of every scale are resized and summed as make_cam's (misc/cam.py).

Scale order: as released (which hard-codes the positions [1, 0, 2, 3]), the second scale of the list
(0.5) is processed first and runs fewer iterations (`adv_iterations`); every accumulated map is
multiplied by 2 when adv_iter > 10. Batching changes no number: the class-runs of several images of one
size share a batch, and every reduction of the rule is taken per class-run.
"""
import numpy as np
import torch
import torch.nn.functional as F

from misc.cam import scale_maps_to_cam, strided_size
from misc.torchutils import precision_context

GRAD_EPS = 1e-12        # the original's epsilon of both normalisations (Grad-CAM count, input gradient)
REDUCED_SCALE_POSITION = 1  # the scale list position processed first with fewer iterations (0.5)


def scale_processing_order(n_scales):
    """Positions of the scale list in processing order: [1, 0, 2, 3, ...] (the original's order)."""
    if n_scales <= REDUCED_SCALE_POSITION:
        return list(range(n_scales))
    return [REDUCED_SCALE_POSITION] + [i for i in range(n_scales) if i != REDUCED_SCALE_POSITION]


def adv_iterations(adv_iter, reduced):
    """Iterations at a scale: adv_iter, or at the reduced scale adv_iter // 2 (> 10), adv_iter (< 6), else 5."""
    if not reduced:
        return adv_iter
    if adv_iter > 10:
        return adv_iter // 2
    if adv_iter < 6:
        return adv_iter
    return 5


def accumulation_multiplier(adv_iter):
    """The original multiplies every accumulated map by 2 when adv_iter > 10, else by 1."""
    return 2.0 if adv_iter > 10 else 1.0


def advcam_regions(model, pairs, classes, n_iter, ad_coeff, step_size, score_th, amp="none",
                   channels_last=False):
    """Accumulated anti-adversarial Grad-CAM regions (n, h', w') of n class-runs.

    pairs: (n, 2, 3, h, w), the MSF pair [x, flip_w(x)] of each run (runs of several images of one
    size may share a batch), or one (2, 3, h, w) pair shared by all runs; classes: (n,) the class of
    each run. model: the CAM net (stage4_features, classifier.weight), frozen BN, so batch elements
    never interact. Every reduction of the per-class rule (positive count of G, max of the region,
    max |g_x|, min and max of x) is taken per run (dims 1.. of a (n, ...) view), so each run's numbers
    are those of running it alone. Everything stays on the pairs' device: no host round trip inside
    the iterations. `amp="bf16"` runs the forward passes under bfloat16 autocast (the reductions and x
    itself stay float32); `channels_last` feeds the net NHWC tensors (same maths).
    """
    device = pairs.device
    classes = torch.as_tensor(classes, dtype=torch.long).to(device)
    n_runs = len(classes)
    if pairs.dim() == 4:
        pairs = pairs.unsqueeze(0).expand(n_runs, *pairs.shape)
    if pairs.shape[:2] != (n_runs, 2):
        raise ValueError(f"pairs {tuple(pairs.shape)} do not match {n_runs} class-runs")
    runs = torch.arange(n_runs, device=device)
    weight = model.classifier.weight
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = pairs.detach().clone()                                             # (n, 2, 3, h, w)
    init, acc = None, None
    for i in range(n_iter):
        x.requires_grad_(True)
        with precision_context(device, amp):
            feat = model.stage4_features(x.flatten(0, 1).contiguous(memory_format=layout))  # (2n, K, h', w')
            maps = F.conv2d(feat, weight)                                    # (2n, C, h', w')
        n_chan, hp, wp = feat.shape[1:]
        relu_maps = F.relu(maps.to(x.dtype)).reshape(n_runs, 2, -1, hp, wp)
        # Grad-CAM: G = d(sum_b v[b, c]) / d feat, weights w = sum_pixels G / (#positive entries of G + eps)
        class_score = relu_maps[runs, :, classes].sum()                     # sum over runs of sum_b v[b, c]
        grad_feat, = torch.autograd.grad(class_score, feat, retain_graph=True)
        grad_feat = grad_feat.to(x.dtype).reshape(n_runs, 2, n_chan, hp, wp)
        positives = (grad_feat > 0).flatten(1).sum(1).to(grad_feat.dtype) + GRAD_EPS   # (n,)
        channel_w = grad_feat.sum(dim=(3, 4)) / positives[:, None, None]    # (n, 2, K), constants
        feat_runs = feat.to(x.dtype).reshape(n_runs, 2, n_chan, hp, wp)
        regions = F.relu((feat_runs * channel_w[..., None, None]).sum(2))
        region = regions[:, 0] + regions[:, 1].flip(-1)                     # (n, h', w')
        if i == 0:
            init = region.detach()
            acc = torch.zeros_like(init)
        acc = acc + region.detach()
        mean_act = relu_maps.mean(dim=(3, 4))                               # (n, 2, C)
        own = mean_act[runs, :, classes].sum(1)                             # (n,)
        loss_cls = own - (mean_act.sum(dim=(1, 2)) - own)
        mask = (region / region.flatten(1).amax(1)[:, None, None] > score_th).to(region.dtype)
        loss_ad = ((region - init).abs() * mask).sum(dim=(1, 2))
        loss = (loss_cls - ad_coeff * loss_ad).sum()
        grad_x, = torch.autograd.grad(loss, x)
        with torch.no_grad():
            flat_x, flat_g = x.flatten(1), grad_x.reshape(n_runs, -1)
            step = step_size * flat_g / (flat_g.abs().amax(1, keepdim=True) + GRAD_EPS)
            lo, hi = flat_x.amin(1, keepdim=True), flat_x.amax(1, keepdim=True)
            x = torch.maximum(torch.minimum(flat_x + step, hi), lo).view_as(x).detach()
    return acc


def advcam_regions_fitting_memory(model, pairs, classes, *rule, **options):
    """`advcam_regions`, splitting the class-runs into smaller batches when the device runs out of memory
    (class-runs are independent: the numbers are the same)."""
    try:
        return advcam_regions(model, pairs, classes, *rule, **options)
    except torch.OutOfMemoryError:
        if len(classes) == 1:
            raise
    if pairs.device.type == "cuda":
        torch.cuda.empty_cache()
    half = len(classes) // 2
    shared = pairs.dim() == 4  # one pair for all runs
    return torch.cat([
        advcam_regions_fitting_memory(model, pairs if shared else pairs[:half], classes[:half], *rule, **options),
        advcam_regions_fitting_memory(model, pairs if shared else pairs[half:], classes[half:], *rule, **options)])


def label_keys(label):
    """The label classes of an image, ascending: int64 (n,)."""
    return torch.nonzero(torch.as_tensor(label).reshape(-1))[:, 0]


def no_label_arrays(size):
    height, width = size
    return {"keys": np.zeros(0, np.int64), "cam": np.zeros((0,) + strided_size((height, width)), np.float32),
            "high_res": np.zeros((0, height, width), np.float32)}


def group_advcam(model, images, adv_iter, ad_coeff, step_size, score_th, amp="none", channels_last=False):
    """The saved arrays (dict(keys, cam, high_res), make_cam's format) of several images of one size.

    images: list of (msf_imgs, (H, W), label) with equal (H, W), hence equal sizes at every scale. At
    each scale the class-runs of all the images form one batch (split further only on out-of-memory);
    no padding is involved, so every run's numbers are those of running it alone.
    """
    device = next(model.parameters()).device
    sizes = {(int(size[0]), int(size[1])) for _, size, _ in images}
    if len(sizes) != 1:
        raise ValueError(f"group_advcam needs images of one size, got {sorted(sizes)}")
    keys = [label_keys(label) for _, _, label in images]
    counts = [len(k) for k in keys]
    owner = torch.repeat_interleave(torch.arange(len(images)), torch.tensor(counts)).to(device)
    classes = torch.cat(keys)
    multiplier = accumulation_multiplier(adv_iter)
    scale_maps = [[] for _ in images]
    if len(classes):
        n_scales = len(images[0][0])
        for position in scale_processing_order(n_scales):
            n_iter = adv_iterations(adv_iter, position == REDUCED_SCALE_POSITION)
            pairs = torch.stack([torch.as_tensor(msf[position]) for msf, _, _ in images]).to(device)
            acc = advcam_regions_fitting_memory(model, pairs[owner], classes, n_iter, ad_coeff, step_size, score_th,
                                                amp=amp, channels_last=channels_last)
            for maps, part in zip(scale_maps, acc.split(counts)):
                maps.append(part * multiplier)
    (size,) = sizes
    results = []
    for k, maps in zip(keys, scale_maps):
        if len(k) == 0:
            results.append(no_label_arrays(size))
            continue
        cam, high_res = scale_maps_to_cam(maps, size)
        results.append({"keys": k.numpy().astype(np.int64), "cam": cam.float().cpu().numpy(),
                        "high_res": high_res.float().cpu().numpy()})
    return results


def image_advcam(model, msf_imgs, size, label, *rule, **options):
    """The saved arrays of one image: dict(keys, cam, high_res) in make_cam's format (`rule`, `options`: those
    of `group_advcam`)."""
    return group_advcam(model, [(msf_imgs, size, label)], *rule, **options)[0]
