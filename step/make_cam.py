"""Make CAMs (SPEC 4.4): multi-scale + flip CAMs of the label classes, one .npz per image.

Output `<cam_out_dir>/<id>.npz`: `keys` (int64, ascending label classes), `cam` (n_keys, strided size)
and `high_res` (n_keys, H, W), float32, each class map divided by its own maximum + 1e-5.

Batching: one forward per scale takes the image and its flip together (the MSF pair), and with
--make_cam_batch N the pairs of up to N images of one size (same-size buckets, misc/batching.py: padding
would change values); the same CAMs (tests). --amp bf16 runs the forwards under bfloat16 autocast
(optional; float32 is the default), --channels_last feeds the net NHWC tensors. Resumable: ids
whose .npz exists are skipped, if the folder's provenance record (misc/provenance.py) says they were
made by the same classifier and scales; else the step stops (or, with --overwrite, recomputes them). On CPU with --num_workers > 1 the pending ids are shared by that many
processes, this one included (one torch thread each), and with --cpu_jit (default) each runs the net as
a frozen TorchScript graph (misc.torchutils.frozen_cpu_graph: the same maps up to float rounding); on a
GPU one process, with --num_workers data-loader workers.

The maths is in pure functions reused elsewhere: `cam_maps` (W-OoD's checkpoint selection computes
CAMs in memory), `accumulate_scale_maps` / `normalise_per_class` (AdvCAM builds its output from its
own per-scale maps).
"""
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from misc import dist, provenance
from misc.batching import same_size_groups
from misc.parallel import run_in_processes
from misc.torchutils import frozen_cpu_graph, precision_context
from misc.utils import InputError, save_npz
from net.resnet50_cam import CAM, load_classifier
from voc12.dataloader import VOC12ClassificationDatasetMSF, load_img_name_list

CAM_STRIDE = 4          # `cam` is saved at 1/4 of the image size
BACKBONE_STRIDE = 16    # high_res is upsampled to the next multiple of 16, then cropped
NORM_EPS = 1e-5         # per-class max normalisation: map / (max + 1e-5)


# --------------------------------------------------------------------------------------------- maths

def strided_size(size, stride=CAM_STRIDE):
    """((H-1)//s+1, (W-1)//s+1): the size of a stride-s map of an (H, W) image."""
    return (size[0] - 1) // stride + 1, (size[1] - 1) // stride + 1


def strided_up_size(size, stride=BACKBONE_STRIDE):
    """(H, W) rounded up to multiples of `stride`."""
    return ((size[0] - 1) // stride + 1) * stride, ((size[1] - 1) // stride + 1) * stride


def accumulate_scale_maps(scale_maps, size):
    """Sum over scales of per-scale maps resized to the image (SPEC 4.4), not normalised.

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
    """Per-scale maps of the kept classes, list of (n, h', w') -> normalised (cam, high_res) (SPEC 4.4)."""
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


# -------------------------------------------------------------------------------------------- I/O

def cam_path(out_dir, img_id):
    return os.path.join(out_dir, img_id + ".npz")


def _size(pack_size):
    return int(pack_size[0]), int(pack_size[1])


def _write_group(model, packs, args, device):
    images = [(pack["img"], _size(pack["size"]), pack["label"]) for pack in packs]
    arrays = group_cam(model, images, device, args.amp, args.channels_last)
    for pack, saved in zip(packs, arrays):
        save_npz(cam_path(args.cam_out_dir, pack["name"]), **saved)


def weights_of(args):
    """The classifier make_cam uses (--make_cam_from) and how to produce it if missing."""
    if args.make_cam_from == "id":
        return args.cam_weights_name, "run train_cam (--train_cam_pass true) first"
    return args.wood_weights_name, "run train_wood (--train_wood_pass true) first, or use --make_cam_from id"


def for_inference(args, model):
    """What make_cam runs: on CPU with --cpu_jit (and no --amp) the CAM net's frozen TorchScript graph,
    else the net (NHWC weights with --channels_last)."""
    if args.cpu_jit and torch.device(args.device).type == "cpu" and args.amp == "none":
        return frozen_cpu_graph(model, torch.zeros(2, 3, 64, 64)) or model
    if args.channels_last:
        return model.to(memory_format=torch.channels_last)
    return model


def _setup_worker(args, weights, hint, ids):
    """The state of one pool process: its net (or frozen graph), dataset and output folder."""
    torch.set_num_threads(1)
    return dict(model=for_inference(args, load_classifier(args, weights, cls=CAM, hint=hint)),
                dataset=VOC12ClassificationDatasetMSF(ids, args.voc12_root, scales=args.cam_scales),
                args=args)


def _work_item(state, index):
    with torch.inference_mode():
        _write_group(state["model"], [state["dataset"][index]], state["args"], torch.device("cpu"))


def _run_pool(args, weights, hint, ids):
    run_in_processes(len(ids), args.num_workers, _setup_worker, (args, weights, hint, ids), _work_item,
                     "make_cam")


def _run_single(args, model, dataset, progress):
    device = torch.device(args.device)
    # On CPU one process does the whole work (--num_workers counts those processes): a loader worker would
    # compete for the same cores and pay for shipping each image's MSF arrays between processes.
    loader_workers = 0 if device.type == "cpu" else args.num_workers
    # batch_size=None: one image per item, its MSF list kept as is
    loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=loader_workers,
                        pin_memory=device.type == "cuda")
    batch = args.make_cam_batch
    if batch < 1:
        raise InputError(f"--make_cam_batch must be at least 1 (images per forward), got {batch}")
    groups = same_size_groups(loader, lambda pack: _size(pack["size"]), batch)
    with torch.inference_mode():
        for packs in groups:
            _write_group(model, packs, args, device)
            progress.update(len(packs))
    progress.close()


def provenance_inputs(args, kind, weights, hint, flags=()):
    """What decides CAMs of the `kind` classifier (id / wood) in `weights` (misc/provenance.py); `flags`
    are the method's further flags (AdvCAM's)."""
    return {"classifier": kind, "weights": provenance.input_file(weights, f"the classifier weights (.pth); {hint}"),
            **provenance.flag_values(args, ["cam_scales", "backbone_width", "amp", *flags])}


def run(args):
    weights, hint = weights_of(args)
    ids = load_img_name_list(args.voc12_root, args.infer_list)
    inputs = provenance_inputs(args, args.make_cam_from, weights, hint)
    dist.main_first(provenance.claim_folder, args.cam_out_dir, "make_cam", inputs, ".npz", args, "--cam_out_dir")
    todo, mine = dist.pending_shard(ids, lambda i: cam_path(args.cam_out_dir, i))
    print(f"make_cam: {len(ids)} images of {args.infer_list}, {len(ids) - len(todo)} already in "
          f"{args.cam_out_dir}, weights {weights}, scales {args.cam_scales}, {dist.world()} process(es)")
    if not mine:
        return
    # built here first so that bad weights or missing images fail at once, with a clear message
    model = load_classifier(args, weights, cls=CAM, hint=hint)
    dataset = VOC12ClassificationDatasetMSF(mine, args.voc12_root, scales=args.cam_scales)
    os.makedirs(args.cam_out_dir, exist_ok=True)
    # under torchrun the ranks are the processes; without it, on CPU, a pool of --num_workers processes
    if dist.world() == 1 and torch.device(args.device).type == "cpu" and args.num_workers > 1 and len(mine) > 1:
        del model, dataset  # every process of the pool, this one too, builds its own
        _run_pool(args, weights, hint, mine)
    else:
        progress = dist.GlobalProgress([cam_path(args.cam_out_dir, i) for i in todo], "make_cam")
        _run_single(args, for_inference(args, model), dataset, progress)
