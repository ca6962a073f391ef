"""Random walk from CAM seeds to semantic pseudo masks (SPEC 5.3), IRN's step/make_sem_seg_labels.py.

Per image of args.infer_list: IRN boundary map at scale 1 (with flip), seeds = strided `cam` of
`<sem_seg_cam_dir>/<id>.npz` ** args.np_power, random walk (radius args.rw_radius, beta args.beta,
2 ** args.exp_times transition steps), x4 bilinear up-sampling, crop, division by the global maximum,
constant background score args.sem_seg_bg_thres, arg-max -> class values.

The original forms T^(2^exp_times) densely (O((hw)^2) memory); here T is sparse and applied
2^exp_times times (misc.indexing.random_walk): the same numbers up to float rounding
(tests/test_random_walk.py, bench/random_walk.py).

Writes `<sem_seg_out_dir>/<id>.png` (class values, single channel) and a palette copy for viewing in
`<sem_seg_out_dir>_color/<id>.png`. Resumable (images whose PNG exists are skipped).
"""
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from misc import dist, indexing, provenance
from misc.camfile import read_cam_file
from misc.utils import InputError, palette_voc, require_dir, save_png
from net.resnet50_irn import FEATURE_STRIDE, load_edge_displacement
from voc12.dataloader import VOC12ClassificationDatasetMSF, load_img_name_list


def color_dir(sem_seg_out_dir):
    """The sibling folder of palette PNGs: <sem_seg_out_dir>_color."""
    return os.path.normpath(sem_seg_out_dir) + "_color"


def walk_to_label(walked, keys, image_size, bg_thres, stride=FEATURE_STRIDE):
    """(H, W) uint8 class values from the walked seeds (n, h, w) of the classes `keys` (n,).

    Up-sample x`stride` (bilinear, align_corners=False), crop to `image_size`, divide by the global
    maximum, put a constant background map `bg_thres` in front, arg-max (ties to the first), map
    index 0 -> 0 and i -> keys[i-1] + 1.
    """
    height, width = image_size
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    if keys.size == 0:  # no class to spread: all background
        return np.zeros((height, width), np.uint8)
    up = F.interpolate(walked[:, None], scale_factor=stride, mode="bilinear",
                       align_corners=False)[:, 0, :height, :width]
    up = up / torch.max(up)
    up = F.pad(up, (0, 0, 0, 0, 1, 0), value=bg_thres)
    index = torch.argmax(up, dim=0).cpu().numpy()
    class_values = np.concatenate([[0], keys + 1]).astype(np.uint8)
    return class_values[index]


def read_seeds(path, label, strided_size):
    """`cam` (n, h, w) float32 and `keys` (n,) of a seed file; InputError unless its keys are exactly the
    image's label classes and its maps have the strided size."""
    keys, cam = read_cam_file(path, "cam", label, strided_size)
    return cam, keys


def _out_path(out_dir, img_id):
    return os.path.join(out_dir, img_id + ".png")


def run(args):
    require_dir(args.sem_seg_cam_dir, "the CAM files <id>.npz of make_cam / make_advcam "
                                      "(set --sem_seg_cam_dir)")
    device = torch.device(args.device)
    ids = load_img_name_list(args.voc12_root, args.infer_list)
    seed_path = lambda img_id: os.path.join(args.sem_seg_cam_dir, img_id + ".npz")
    missing = [i for i in ids if not os.path.isfile(seed_path(i))]
    if missing:
        raise InputError(f"{len(missing)} CAM file(s) of --infer_list missing from {args.sem_seg_cam_dir}, "
                         f"e.g. {seed_path(missing[0])}: run make_cam / make_advcam on the same "
                         f"--infer_list first")
    inputs = {"cams": provenance.folder_identity(args.sem_seg_cam_dir),
              "irn_weights": provenance.input_file(args.irn_weights_name, "the IRN weights (.pth); run train_irn "
                                                                          "(--train_irn_pass true) first"),
              **provenance.flag_values(args, ["beta", "exp_times", "rw_radius", "sem_seg_bg_thres", "np_power",
                                              "irn_crop_size", "backbone_width"])}
    dist.main_first(provenance.claim_folder, args.sem_seg_out_dir, "make_sem_seg", inputs, ".png", args,
                    "--sem_seg_out_dir")
    todo, mine = dist.pending_shard(ids, lambda img_id: _out_path(args.sem_seg_out_dir, img_id))
    print(f"make_sem_seg_labels: {len(ids) - len(todo)} of {len(ids)} done already, {len(todo)} to do "
          f"-> {args.sem_seg_out_dir}")
    if not mine:
        return
    model = load_edge_displacement(args)
    dataset = VOC12ClassificationDatasetMSF(mine, voc12_root=args.voc12_root, scales=(1.0,))
    loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=args.num_workers)
    palette, colour_folder = palette_voc(), color_dir(args.sem_seg_out_dir)

    progress = dist.GlobalProgress([_out_path(args.sem_seg_out_dir, i) for i in todo], "make_sem_seg_labels")
    with torch.inference_mode():
        for pack in loader:
            img_id, (height, width) = pack["name"], pack["size"]
            boundary, _ = model(torch.as_tensor(pack["img"][0]).to(device))
            cam, keys = read_seeds(seed_path(img_id), pack["label"], boundary.shape)
            seeds = torch.from_numpy(np.power(cam, args.np_power)).to(device)
            if keys.size:
                walked = indexing.random_walk(seeds, boundary, args.rw_radius, args.beta, args.exp_times)
            else:
                walked = seeds
            pred = walk_to_label(walked, keys, (int(height), int(width)), args.sem_seg_bg_thres)
            save_png(_out_path(colour_folder, img_id), pred, palette=palette)
            save_png(_out_path(args.sem_seg_out_dir, img_id), pred)
            progress.update(1)
    progress.close()
