"""Make CAMs (docs/method.md §4.4), IRN's step/make_cam.py: multi-scale + flip CAMs of the label classes.

Reads the classifier of --make_cam_from (id: --cam_weights_name, wood: --wood_weights_name) and the images of
--infer_list; writes `<cam_out_dir>/<id>.npz` with `keys` (int64, ascending label classes), `cam` (n_keys,
strided size) and `high_res` (n_keys, H, W), float32, each class map divided by its own maximum + 1e-5
(misc/cam.py). Resumable; several processes (torchrun ranks, or --num_workers CPU processes) share the
images. Speed options that keep the maps (docs/benchmarks.md): --make_cam_batch (images of one size per
forward), --cpu_jit (a frozen TorchScript graph on CPU, equal up to float rounding), --amp bf16 and
--channels_last.
"""
import torch

from misc import steptools
from misc.cam import group_cam
from misc.torchutils import frozen_cpu_graph
from misc.utils import save_npz
from net.classifier import load_classifier
from voc12.dataloader import VOC12ClassificationDatasetMSF, load_img_name_list


def cam_path(out_dir, img_id):
    return steptools.output_path(out_dir, img_id, ".npz")


def image_size(pack):
    return int(pack["size"][0]), int(pack["size"][1])


def for_inference(args, model):
    """What make_cam runs: on CPU with --cpu_jit (and no --amp) the CAM net's frozen TorchScript graph,
    else the net (NHWC weights with --channels_last)."""
    if args.cpu_jit and torch.device(args.device).type == "cpu" and args.amp == "none":
        return frozen_cpu_graph(model, torch.zeros(2, 3, 64, 64)) or model
    if args.channels_last:
        return model.to(memory_format=torch.channels_last)
    return model


def setup(args, weights, hint, ids):
    """A process's state: its net (or frozen graph) and the images' MSF dataset."""
    model = load_classifier(weights, args.backbone, args.backbone_width, args.device, "cam", hint)
    return {"model": for_inference(args, model),
            "dataset": VOC12ClassificationDatasetMSF(ids, args.voc12_root, scales=args.cam_scales), "args": args}


def write(state, packs):
    args = state["args"]
    images = [(pack["img"], image_size(pack), pack["label"]) for pack in packs]
    with torch.inference_mode():
        arrays = group_cam(state["model"], images, torch.device(args.device), args.amp, args.channels_last)
    for pack, saved in zip(packs, arrays):
        save_npz(cam_path(args.cam_out_dir, pack["name"]), **saved)


def provenance_inputs(args):
    """What decides the CAM files (misc/provenance.py)."""
    return steptools.cam_inputs(args, args.make_cam_from, *steptools.classifier_weights(args, "--make_cam_from"))


def run(args):
    weights, hint = steptools.classifier_weights(args, "--make_cam_from")
    ids = load_img_name_list(args.voc12_root, args.infer_list)
    steptools.run_pending("make_cam", ids, args.cam_out_dir, ".npz", provenance_inputs(args), args, "--cam_out_dir",
                          setup, (args, weights, hint), write, about=f"; weights {weights}, scales {args.cam_scales}",
                          n_processes=steptools.cpu_processes(args), num_workers=steptools.loader_workers(args),
                          group_size=args.make_cam_batch, size_of=image_size)
