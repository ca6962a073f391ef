"""Random walk from CAM seeds to semantic pseudo masks (docs/method.md §5.3), IRN's step/make_sem_seg_labels.py.

Per image of --infer_list: the IRN boundary map at scale 1 (with flip), seeds = the strided `cam` of
`<sem_seg_cam_dir>/<id>.npz` ** --np_power, the random walk (radius --rw_radius, --beta, 2 ** --exp_times
transition steps; misc/indexing.py applies a sparse transition matrix instead of the release's dense power: the
same numbers up to float rounding), then `walk_to_label` with the background score --sem_seg_bg_thres. Writes
`<sem_seg_out_dir>/<id>.png` (class values) and a palette copy in `<sem_seg_out_dir>_color/<id>.png`.
Resumable; torchrun ranks share the images.
"""
import os

import numpy as np
import torch

from misc import indexing, irn_maps, provenance, steptools
from misc.utils import palette_voc, save_png
from voc12.dataloader import load_img_name_list


def color_dir(sem_seg_out_dir):
    """The sibling folder of palette PNGs: <sem_seg_out_dir>_color."""
    return os.path.normpath(sem_seg_out_dir) + "_color"


def setup(args, ids):
    return irn_maps.setup(args, ids, palette=palette_voc())


def write(state, packs):
    args, device = state["args"], torch.device(state["args"].device)
    for pack in packs:
        img_id, (height, width) = pack["name"], pack["size"]
        boundary, _, keys, cam = irn_maps.maps_and_seeds(state, pack)
        with torch.inference_mode():
            seeds = torch.from_numpy(np.power(cam, args.np_power)).to(device)
            walked = indexing.random_walk(seeds, boundary, args.rw_radius, args.beta, args.exp_times) \
                if keys.size else seeds
            pred = indexing.walk_to_label(walked, keys, (int(height), int(width)), args.sem_seg_bg_thres)
        save_png(steptools.output_path(color_dir(args.sem_seg_out_dir), img_id, ".png"), pred,
                 palette=state["palette"])
        save_png(steptools.output_path(args.sem_seg_out_dir, img_id, ".png"), pred)


def provenance_inputs(args):
    """What decides the pseudo masks (misc/provenance.py)."""
    return {"cams": provenance.folder_identity(args.sem_seg_cam_dir),
            "irn_weights": provenance.input_file(args.irn_weights_name, "the IRN weights (.pth); run train_irn "
                                                                        "(--train_irn_pass true) first"),
            **provenance.flag_values(args, ["beta", "exp_times", "rw_radius", "sem_seg_bg_thres", "np_power",
                                            "irn_crop_size", "backbone_width"]),
            **provenance.non_default_flags(args, {"backbone": "resnet50"})}


def run(args):
    ids = load_img_name_list(args.voc12_root, args.infer_list)
    steptools.require_files(args.sem_seg_cam_dir, ids, ".npz", "CAM files of --infer_list",
                            "run make_cam / make_advcam on the same --infer_list first (set --sem_seg_cam_dir)")
    steptools.run_pending("make_sem_seg", ids, args.sem_seg_out_dir, ".png", provenance_inputs(args), args,
                          "--sem_seg_out_dir", setup, (args,), write, num_workers=args.num_workers)
