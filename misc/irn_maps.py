"""What make_sem_seg and make_ins_seg share (docs/method.md §5.3, §9): a process's trained IRN and images, and per
image IRN's boundary map and displacement field at scale 1 (with flip) beside the seeds of its CAM file."""
import torch

from misc import steptools
from misc.camfile import read_cam_file
from net.resnet50_irn import load_edge_displacement
from voc12.dataloader import VOC12ClassificationDatasetMSF


def setup(args, ids, **extra):
    """A per-image step's state: the trained IRN (--irn_weights_name) on --device, the images at scale 1, `args`
    and `extra`."""
    model = load_edge_displacement(args.irn_weights_name, args.backbone, args.backbone_width, args.irn_crop_size,
                                   args.device)
    return {"model": model, "args": args, **extra,
            "dataset": VOC12ClassificationDatasetMSF(ids, voc12_root=args.voc12_root, scales=(1.0,))}


@torch.inference_mode()
def maps_and_seeds(state, pack):
    """(boundary (h, w), displacement (2, h, w), keys (n,), cam (n, h, w) numpy) of one image: IRN's maps and the
    strided CAMs of `<sem_seg_cam_dir>/<id>.npz`, checked against the image's labels and the maps' size."""
    args = state["args"]
    boundary, displacement = state["model"](torch.as_tensor(pack["img"][0]).to(torch.device(args.device)))
    keys, cam = read_cam_file(steptools.output_path(args.sem_seg_cam_dir, pack["name"], ".npz"), "cam",
                              pack["label"], boundary.shape)
    return boundary, displacement, keys, cam
