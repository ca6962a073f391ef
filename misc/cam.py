"""CAM maths (docs/method.md §4.4): multi-scale CAMs of a classifier, resized, summed and normalised.

Pure functions, tensors in and out: make_cam saves what `group_cam` returns, make_advcam builds its output
from its own per-scale maps with `scale_maps_to_cam`, W-OoD's checkpoint selection computes CAMs in memory
with `cam_maps` + `keep_label_classes`, and the mined-OoD review page overlays them.

The saved arrays of one image: `keys` (int64, ascending label classes), `cam` (n_keys, strided size) and
`high_res` (n_keys, H, W), float32, each class map divided by its own maximum + 1e-5.
"""
import numpy as np
import torch
import torch.nn.functional as F

from misc.torchutils import precision_context

CAM_STRIDE = 4          # `cam` is saved at 1/4 of the image size
BACKBONE_STRIDE = 16    # high_res is upsampled to the next multiple of 16, then cropped
NORM_EPS = 1e-5         # per-class max normalisation: map / (max + 1e-5)


def strided_size(size, stride=CAM_STRIDE):
    """((H-1)//s+1, (W-1)//s+1): the size of a stride-s map of an (H, W) image."""
    return (size[0] - 1) // stride + 1, (size[1] - 1) // stride + 1


def strided_up_size(size, stride=BACKBONE_STRIDE):
    """(H, W) rounded up to multiples of `stride`."""
    return ((size[0] - 1) // stride + 1) * stride, ((size[1] - 1) // stride + 1) * stride


def accumulate_scale_maps(scale_maps, size):
    """Sum over scales of per-scale maps resized to the image (docs/method.md §4.4), not normalised.

    `scale_maps`: list over scales of (n, h', w') tensors. Returns (strided (n, (H-1)//4+1, (W-1)//4+1),
    high_res (n, H, W)): bilinear (align_corners=False) resizes to the strided size, and to the
    strided-up size cropped to (H, W), summed over scales in list order.
    """
    height, width = int(size[0]), int(size[1])
    small, up = strided_size((height, width)), strided_up_size((height, width))
    strided = torch.stack([F.interpolate(m.unsqueeze(0), small, mode="bilinear", align_corners=False)[0]
                           for m in scale_maps]).sum(0)
    high_res = torch.stack([F.interpolate(m.unsqueeze(0), up, mode="bilinear", align_corners=False)[0]
                            for m in scale_maps]).sum(0)[:, :height, :width]
    return strided, high_res


def normalise_per_class(maps):
    """Each (.., h, w) map divided by its own maximum + 1e-5."""
    return maps / (maps.amax(dim=(-2, -1), keepdim=True) + NORM_EPS)


def scale_maps_to_cam(scale_maps, size):
    """Per-scale maps of the kept classes, list of (n, h', w') -> normalised (cam, high_res) (docs/method.md §4.4)."""
    strided, high_res = accumulate_scale_maps(scale_maps, size)
    return normalise_per_class(strided), normalise_per_class(high_res)


def keep_label_classes(strided, high_res, label):
    """Keep the label classes (ascending) and normalise: -> (keys int64 (n,), cam (n, h, w), high_res (n, H, W))."""
    keys = torch.nonzero(torch.as_tensor(label).reshape(-1))[:, 0]
    keys_dev = keys.to(strided.device)
    return keys, normalise_per_class(strided[keys_dev]), normalise_per_class(high_res[keys_dev])


def cam_maps(model, msf_imgs, size):
    """All-class CAMs of one image: (strided (20, h, w), high_res (20, H, W)), not normalised.

    `model` is a CAM net; `msf_imgs` the MSF list over scales of (2, 3, h_s, w_s) pairs; `size` (H, W).
    One forward per scale; the caller chooses the grad mode (make_cam runs under inference_mode).
    """
    device = next(model.parameters()).device
    outputs = [model(torch.as_tensor(pair).to(device)) for pair in msf_imgs]
    return accumulate_scale_maps(outputs, size)


def pair_maps(model, pairs, channels_last=False):
    """CAM forward of several MSF pairs of one size, (B, 2, 3, h, w) -> (B, 20, h', w'): one batch for the
    eager net (`forward_pairs`), one pair at a time for a frozen graph (traced on single pairs)."""
    if not hasattr(model, "forward_pairs"):
        return torch.stack([model(pair) for pair in pairs])
    if channels_last:  # NHWC storage; flatten(0, 1) inside forward_pairs keeps it
        pairs = pairs.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    return model.forward_pairs(pairs)


def group_cam(model, images, device, amp="none", channels_last=False):
    """The saved arrays (dict(keys, cam, high_res), numpy int64 / float32 / float32) of several images of
    one size: images is a list of (msf_imgs, (H, W), label); one forward per scale for all of them.

    Only the label classes are resized: bilinear resizing works channel by channel, so this equals
    resizing all 20 maps and keeping the label classes afterwards, at a fraction of the cost. With
    `amp="bf16"` the forwards run under bfloat16 autocast; resizes and normalisation stay float32.
    """
    sizes = {(int(size[0]), int(size[1])) for _, size, _ in images}
    if len(sizes) != 1:
        raise ValueError(f"group_cam needs images of one size, got {sorted(sizes)}")
    keys = [torch.nonzero(torch.as_tensor(label).reshape(-1))[:, 0] for _, _, label in images]
    keys_dev = [k.to(device) for k in keys]
    per_image = [[] for _ in images]
    for position in range(len(images[0][0])):
        pairs = torch.stack([torch.as_tensor(msf[position]) for msf, _, _ in images]).to(device)
        with precision_context(device, amp):
            maps = pair_maps(model, pairs, channels_last)
        for out, k, m in zip(per_image, keys_dev, maps.to(pairs.dtype)):  # bf16 -> the input's float
            out.append(m[k])
    (size,) = sizes
    results = []
    for k, outputs in zip(keys, per_image):
        cam, high_res = scale_maps_to_cam(outputs, size)
        results.append({"keys": k.cpu().numpy().astype(np.int64), "cam": cam.float().cpu().numpy(),
                        "high_res": high_res.float().cpu().numpy()})
    return results


def image_cam(model, msf_imgs, size, label, device):
    """The saved arrays of one image: dict(keys, cam, high_res) as numpy (int64, float32, float32).

    `model` is a CAM net on `device` (or its frozen graph, which has no parameters to ask).
    """
    return group_cam(model, [(msf_imgs, size, label)], device)[0]
