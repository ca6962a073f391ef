"""Instance pseudo labels from CAMs and IRN (docs/method.md §9), IRN's step/make_ins_seg_labels.py and the
release's make_cocoann.

Per image of --infer_list: the IRN boundary map and displacement field at scale 1 (with flip; the displacement of
the un-flipped image), the strided `cam` of `<sem_seg_cam_dir>/<id>.npz` (make_sem_seg's seeds, no power), then
misc/instance.py: centroids after --ins_seg_centroid_iterations steps, instances = weak-displacement regions
(|dp| < --ins_seg_cluster_thres), every class CAM times every instance mask spread by make_sem_seg's random walk
(--rw_radius, --beta, --exp_times), background score --ins_seg_bg_thres, one detection per connected component
(score 0 below --ins_seg_fragment_fraction of the image). Writes `<ins_seg_out_dir>/<id>.npz` (score (N,)
float32, mask (N, H, W) bool, class (N,) int64; the release pickles a dict) and, once every image of the list is
done, `<ins_seg_out_dir>/coco_<list>.json` (misc/coco.py: COCO format, RLE masks, detections with score >= 1e-5).
Resumable; torchrun ranks share the images.
"""
import os

import torch

from misc import coco, dist, instance, irn_maps, provenance, steptools
from misc.utils import save_json, save_npz
from voc12.dataloader import load_img_name_list

SUFFIX = ".npz"


def coco_path(ins_seg_out_dir, infer_list):
    """<ins_seg_out_dir>/coco_<list name>.json (train, train_aug, or the list file's name)."""
    name = os.path.splitext(os.path.basename(os.fspath(infer_list)))[0]
    return os.path.join(ins_seg_out_dir, f"coco_{name}.json")


def write(state, packs):
    args, device = state["args"], torch.device(state["args"].device)
    for pack in packs:
        img_id, (height, width) = pack["name"], pack["size"]
        boundary, displacement, keys, cam = irn_maps.maps_and_seeds(state, pack)
        with torch.inference_mode():
            detections = instance.instances_of_image(
                torch.from_numpy(cam).to(device), keys, boundary, displacement, (int(height), int(width)),
                bg_thres=args.ins_seg_bg_thres, beta=args.beta, exp_times=args.exp_times, radius=args.rw_radius,
                centroid_iterations=args.ins_seg_centroid_iterations, cluster_thres=args.ins_seg_cluster_thres,
                fragment_fraction=args.ins_seg_fragment_fraction)
        save_npz(steptools.output_path(args.ins_seg_out_dir, img_id, SUFFIX), **detections)


def up_to_date(path, sources):
    """Whether `path` exists and is not older than any of the files `sources` it is made from."""
    return os.path.isfile(path) and os.path.getmtime(path) >= max(os.path.getmtime(s) for s in sources)


def write_coco(ids, ins_seg_out_dir, path):
    """The COCO json of the instance files of `ids` (misc/coco.py); returns the number of annotations."""
    out = coco.new_coco()
    for img_id in ids:
        det = instance.read_detections(steptools.output_path(ins_seg_out_dir, img_id, SUFFIX))
        out["images"].append(coco.image_entry(img_id, det["mask"].shape[1:]))
        out["annotations"] += coco.detection_annotations(img_id, det, len(out["annotations"]) + 1)
    save_json(path, out)
    return len(out["annotations"])


def provenance_inputs(args):
    """What decides the instance files (misc/provenance.py)."""
    return {"cams": provenance.folder_identity(args.sem_seg_cam_dir),
            "irn_weights": provenance.input_file(args.irn_weights_name, "the IRN weights (.pth); run train_irn "
                                                                        "(--train_irn_pass true) first"),
            **provenance.flag_values(args, ["beta", "exp_times", "rw_radius", "ins_seg_bg_thres",
                                            "ins_seg_centroid_iterations", "ins_seg_cluster_thres",
                                            "ins_seg_fragment_fraction", "irn_crop_size", "backbone_width"]),
            **provenance.non_default_flags(args, {"backbone": "resnet50"})}


def run(args):
    ids = load_img_name_list(args.voc12_root, args.infer_list)
    steptools.require_files(args.sem_seg_cam_dir, ids, ".npz", "CAM files of --infer_list",
                            "run make_cam / make_advcam on the same --infer_list first (set --sem_seg_cam_dir)")
    steptools.run_pending("make_ins_seg", ids, args.ins_seg_out_dir, SUFFIX, provenance_inputs(args), args,
                          "--ins_seg_out_dir", irn_maps.setup, (args,), write, num_workers=args.num_workers)
    dist.barrier()  # every rank's images are written
    json_path = coco_path(args.ins_seg_out_dir, args.infer_list)
    sources = [steptools.output_path(args.ins_seg_out_dir, i, SUFFIX) for i in ids]
    sources.append(os.path.join(args.ins_seg_out_dir, provenance.FOLDER_MANIFEST))
    if dist.is_main() and not up_to_date(json_path, sources):
        n_annotations = write_coco(ids, args.ins_seg_out_dir, json_path)
        print(f"make_ins_seg: {n_annotations} instance(s) of score >= {coco.MIN_SCORE:g} in {len(ids)} images "
              f"-> {json_path}")
