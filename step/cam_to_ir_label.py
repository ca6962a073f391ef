"""Confident inter-pixel-relation labels from CAM seeds (SPEC 5.1), IRN's step/cam_to_ir_label.py.

For every image of args.infer_list: read `<ir_label_cam_dir>/<id>.npz` (keys, high_res) and the RGB
image; arg-max with a constant background score at args.conf_fg_thres and at args.conf_bg_thres,
refine both with a dense CRF; confident foreground where the high-threshold map says so, confident
background where both say background, 255 (unsure) elsewhere. Writes `<ir_label_out_dir>/<id>.png`
(single channel). Resumable (existing PNGs are kept); images run in a process pool of
args.num_workers.
"""
import functools
import multiprocessing
import os

import numpy as np

from misc import dist, imutils, provenance
from misc.crf import crf_inference_label
from misc.camfile import read_cam_file
from misc.utils import InputError, require_dir, save_png
from voc12.dataloader import img_path, load_image_labels, load_img_name_list

UNSURE = 255


def seed_index(high_res, threshold):
    """Arg-max over [constant background = threshold, class maps] (ties to the first): indices 0..n."""
    high_res = np.asarray(high_res)
    background = np.full((1,) + high_res.shape[1:], threshold, dtype=high_res.dtype)
    return np.argmax(np.concatenate([background, high_res], axis=0), axis=0)


def combine_fg_bg(fg_conf, bg_conf):
    """IR label from the two class-value maps: fg where fg_conf says so, 0 where both say background,
    UNSURE elsewhere (`ir = fg; ir[fg == 0] = 255; ir[fg + bg == 0] = 0`)."""
    fg_conf = np.asarray(fg_conf, dtype=np.int64)
    bg_conf = np.asarray(bg_conf, dtype=np.int64)
    conf = fg_conf.copy()
    conf[fg_conf == 0] = UNSURE
    conf[fg_conf + bg_conf == 0] = 0
    return conf.astype(np.uint8)


def ir_label(img, high_res, keys, fg_thres, bg_thres):
    """(H, W) uint8 IR label of one image from its RGB image, `high_res` (n, H, W) and class `keys` (n,)."""
    class_values = np.concatenate([[0], np.asarray(keys, dtype=np.int64).reshape(-1) + 1])
    n_labels = class_values.shape[0]
    fg_conf = class_values[crf_inference_label(img, seed_index(high_res, fg_thres), n_labels)]
    bg_conf = class_values[crf_inference_label(img, seed_index(high_res, bg_thres), n_labels)]
    return combine_fg_bg(fg_conf, bg_conf)


def _seed_path(cam_dir, img_id):
    return os.path.join(cam_dir, img_id + ".npz")


def _out_path(out_dir, img_id):
    return os.path.join(out_dir, img_id + ".png")


def _work(img_id, cam_dir, out_dir, voc12_root, fg_thres, bg_thres, labels):
    img = imutils.read_rgb(img_path(voc12_root, img_id))
    keys, high_res = read_cam_file(_seed_path(cam_dir, img_id), "high_res", labels[img_id], img.shape[:2])
    save_png(_out_path(out_dir, img_id), ir_label(img, high_res, keys, fg_thres, bg_thres))
    return img_id


def run(args):
    require_dir(args.ir_label_cam_dir, "the CAM files <id>.npz of make_cam / make_advcam "
                                       "(set --ir_label_cam_dir)")
    ids = load_img_name_list(args.voc12_root, args.infer_list)
    missing = [i for i in ids if not os.path.isfile(_seed_path(args.ir_label_cam_dir, i))]
    if missing:
        raise InputError(f"{len(missing)} CAM file(s) of --infer_list missing from {args.ir_label_cam_dir}, "
                         f"e.g. {_seed_path(args.ir_label_cam_dir, missing[0])}: run make_cam / make_advcam "
                         f"on the same --infer_list first")
    inputs = {"cams": provenance.folder_identity(args.ir_label_cam_dir),
              **provenance.flag_values(args, ["conf_fg_thres", "conf_bg_thres"])}
    dist.main_first(provenance.claim_folder, args.ir_label_out_dir, "cam_to_ir_label", inputs, ".png", args,
                    "--ir_label_out_dir")
    todo, mine = dist.pending_shard(ids, functools.partial(_out_path, args.ir_label_out_dir))
    print(f"cam_to_ir_label: {len(ids) - len(todo)} of {len(ids)} done already, {len(todo)} to do "
          f"-> {args.ir_label_out_dir}")
    work = functools.partial(_work, cam_dir=args.ir_label_cam_dir, out_dir=args.ir_label_out_dir,
                             voc12_root=args.voc12_root, fg_thres=args.conf_fg_thres,
                             bg_thres=args.conf_bg_thres,
                             labels=dict(zip(mine, load_image_labels(args.voc12_root, mine))))
    progress = dist.GlobalProgress([_out_path(args.ir_label_out_dir, i) for i in todo], "cam_to_ir_label")
    if args.num_workers <= 1 or len(mine) <= 1:  # under torchrun: this rank's images, in its own pool
        for img_id in mine:
            work(img_id)
            progress.update(1)
    else:
        with multiprocessing.get_context("fork").Pool(args.num_workers) as pool:
            for _ in pool.imap_unordered(work, mine, chunksize=1):
                progress.update(1)
    progress.close()
