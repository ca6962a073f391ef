"""Confident inter-pixel-relation labels from CAM seeds (docs/method.md §5.1), IRN's step/cam_to_ir_label.py.

For every image of --infer_list: read `<ir_label_cam_dir>/<id>.npz` (keys, high_res) and the RGB image; arg-max
with a constant background score at --conf_fg_thres and at --conf_bg_thres, each refined by a dense CRF;
confident foreground where the high-threshold map says so, confident background where both say background, 255
(unsure) elsewhere. Writes `<ir_label_out_dir>/<id>.png` (single channel). Resumable; the CRF runs in
--num_workers CPU processes (per rank under torchrun).
"""
import numpy as np

from misc import imutils, provenance, steptools
from misc.camfile import read_cam_file
from misc.crf import crf_inference_label
from misc.utils import save_png
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


def setup(args, ids):
    return {"dataset": steptools.IdDataset(ids), "args": args,
            "labels": dict(zip(ids, load_image_labels(args.voc12_root, ids)))}


def write(state, img_ids):
    args = state["args"]
    for img_id in img_ids:
        img = imutils.read_rgb(img_path(args.voc12_root, img_id))
        keys, high_res = read_cam_file(steptools.output_path(args.ir_label_cam_dir, img_id, ".npz"), "high_res",
                                       state["labels"][img_id], img.shape[:2])
        save_png(steptools.output_path(args.ir_label_out_dir, img_id, ".png"),
                 ir_label(img, high_res, keys, args.conf_fg_thres, args.conf_bg_thres))


def provenance_inputs(args):
    """What decides the IR labels (misc/provenance.py)."""
    return {"cams": provenance.folder_identity(args.ir_label_cam_dir),
            **provenance.flag_values(args, ["conf_fg_thres", "conf_bg_thres"])}


def run(args):
    ids = load_img_name_list(args.voc12_root, args.infer_list)
    steptools.require_files(args.ir_label_cam_dir, ids, ".npz", "CAM files of --infer_list",
                            "run make_cam / make_advcam on the same --infer_list first (set --ir_label_cam_dir)")
    # CPU work whatever the device: --num_workers processes (per rank under torchrun)
    steptools.run_pending("cam_to_ir_label", ids, args.ir_label_out_dir, ".png", provenance_inputs(args), args,
                          "--ir_label_out_dir",
                          setup, (args,), write, n_processes=max(1, args.num_workers))
