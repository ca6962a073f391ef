"""AdvCAM (docs/method.md §4.6), AdvCAM's obtain_CAM_masking: anti-adversarial CAMs, by default from the W-OoD
classifier.

Reads the classifier of --make_advcam_from (wood: --wood_weights_name, id: --cam_weights_name) and the images
of --infer_list; writes `<advcam_out_dir>/<id>.npz` in make_cam's format (keys, cam, high_res). The maths,
scale order and quirks are misc/advcam.py's. Resumable; several processes (torchrun ranks, or --num_workers
CPU processes) share the images. --advcam_batch N puts the class-runs of up to N images of one size in one
batch (the same maps; split further when the device runs out of memory); --amp bf16 and --channels_last are
options (docs/benchmarks.md).
"""
import torch

from misc import steptools
from misc.advcam import group_advcam, scale_processing_order
from misc.utils import save_npz
from net.classifier import load_classifier
from voc12.dataloader import VOC12ClassificationDatasetMSF, load_img_name_list

ADVCAM_FLAGS = ["adv_iter", "AD_coeff", "AD_stepsize", "score_th"]


def advcam_path(out_dir, img_id):
    return steptools.output_path(out_dir, img_id, ".npz")


def image_size(pack):
    return int(pack["size"][0]), int(pack["size"][1])


def load_attacked_model(args, weights, hint):
    model = load_classifier(weights, args.backbone, args.backbone_width, args.device, "features", hint)
    for p in model.parameters():  # only input gradients are needed
        p.requires_grad_(False)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def setup(args, weights, hint, ids):
    """A process's state: the attacked net and the images' MSF dataset."""
    return {"model": load_attacked_model(args, weights, hint),
            "dataset": VOC12ClassificationDatasetMSF(ids, args.voc12_root, scales=args.cam_scales), "args": args}


def write(state, packs):
    args = state["args"]
    images = [(pack["img"], image_size(pack), pack["label"]) for pack in packs]
    arrays = group_advcam(state["model"], images, args.adv_iter, args.AD_coeff, args.AD_stepsize, args.score_th,
                          amp=args.amp, channels_last=args.channels_last)
    for pack, saved in zip(packs, arrays):
        save_npz(advcam_path(args.advcam_out_dir, pack["name"]), **saved)


def provenance_inputs(args):
    """What decides the AdvCAM files (misc/provenance.py)."""
    return steptools.cam_inputs(args, args.make_advcam_from, *steptools.classifier_weights(args, "--make_advcam_from"),
                                ADVCAM_FLAGS)


def run(args):
    weights, hint = steptools.classifier_weights(args, "--make_advcam_from")
    ids = load_img_name_list(args.voc12_root, args.infer_list)
    order = [args.cam_scales[p] for p in scale_processing_order(len(args.cam_scales))]
    about = (f"; weights {weights}, scales {order} (in this order), adv_iter {args.adv_iter}, AD_coeff "
             f"{args.AD_coeff}, AD_stepsize {args.AD_stepsize}, score_th {args.score_th}, {args.advcam_batch} "
             f"image(s) of one size per batch, amp {args.amp}{', channels_last' if args.channels_last else ''}")
    steptools.run_pending("make_advcam", ids, args.advcam_out_dir, ".npz",
                          provenance_inputs(args), args,
                          "--advcam_out_dir", setup, (args, weights, hint), write, about=about,
                          n_processes=steptools.cpu_processes(args), num_workers=steptools.loader_workers(args),
                          group_size=args.advcam_batch, size_of=image_size)
