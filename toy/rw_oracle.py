"""Where the random walk wins or loses: seeds alone vs walked with IRN's boundary, with the edges of the
IR labels IRN learns from, and with an oracle boundary made of the ground truth's object edges.

    python toy/rw_oracle.py [driver flags, e.g. --preset toy --work_dir result/toy]

For every image of --infer_list: IRN's boundary map (--irn_weights_name) and the seeds of
--sem_seg_cam_dir (`cam ** np_power`, as make_sem_seg_labels), then three label maps, each made the way
make_sem_seg_labels makes its masks (x4 up-sampling, division by the global maximum, constant background
score, arg-max) and scored with the metric of eval_sem_seg for a range of background scores:
- `seeds`: no walk (the seeds themselves, through the same up-sampling);
- `walk_irn`: the random walk of make_sem_seg_labels (radius --rw_radius, --beta, 2 ** --exp_times steps);
- `walk_ir_edges`: the same walk on a boundary map that is 1 in every stride-4 cell holding an edge of the
  IR label map of --ir_label_out_dir (unsure 255 as a label of its own) and 0 elsewhere: the best
  boundary IRN can learn from what it is taught;
- `walk_gt_edges`: the same with the edges of the ground truth: an object boundary that is right.
Reading it: `walk_gt_edges` above `seeds` means the walk works given a right boundary; `walk_ir_edges`
below `seeds` means the IR labels do not hold the object's boundary, so IRN cannot learn it.
Last line: `seeds=<best> walk_irn=<best> walk_ir_edges=<best> walk_gt_edges=<best>` (best mIoU over the
background scores).
"""
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import run_sample  # noqa: E402
from misc import indexing  # noqa: E402
from misc.camfile import read_cam_file  # noqa: E402
from misc.indexing import walk_to_label  # noqa: E402
from misc.metrics import confusion_matrix, scores  # noqa: E402
from net.resnet50_irn import FEATURE_STRIDE, load_edge_displacement  # noqa: E402
from voc12.dataloader import VOC12ClassificationDatasetMSF, load_gt, load_img_name_list, read_index_png  # noqa: E402

BG_SCORES = [0.1, 0.15, 0.22, 0.3, 0.4, 0.5, 0.6]
VARIANTS = ["seeds", "walk_irn", "walk_ir_edges", "walk_gt_edges"]


def label_edge_boundary(label_map, strided_shape, stride=FEATURE_STRIDE):
    """(h, w) float32 map: 1 in each stride x stride cell that holds two different values of `label_map`
    (H, W) side by side (255 counts as a value of its own), 0 elsewhere."""
    h, w = strided_shape
    label = np.full((h * stride, w * stride), -1, np.int64)  # padding: no edge against it
    label[:label_map.shape[0], :label_map.shape[1]] = label_map
    edge = np.zeros(label.shape, bool)
    inside = label >= 0
    horizontal = (label[:, 1:] != label[:, :-1]) & inside[:, 1:] & inside[:, :-1]
    vertical = (label[1:] != label[:-1]) & inside[1:] & inside[:-1]
    edge[:, 1:] |= horizontal
    edge[1:] |= vertical
    return torch.from_numpy(edge.reshape(h, stride, w, stride).any(axis=(1, 3)).astype(np.float32))


def main(argv=None):
    args = run_sample.parse_args(argv if argv is not None else sys.argv[1:])
    if args.cpu_threads:  # as the driver does
        torch.set_num_threads(args.cpu_threads)
    ids = load_img_name_list(args.voc12_root, args.infer_list)
    model = load_edge_displacement(args.irn_weights_name, args.backbone, args.backbone_width, args.irn_crop_size,
                                   args.device)
    dataset = VOC12ClassificationDatasetMSF(ids, voc12_root=args.voc12_root, scales=(1.0,))
    confusion = {(v, t): np.zeros((21, 21), np.int64) for v in VARIANTS for t in BG_SCORES}
    with torch.inference_mode():
        for i in tqdm(range(len(dataset)), desc="rw_oracle"):
            pack = dataset[i]
            size = (int(pack["size"][0]), int(pack["size"][1]))
            gt = load_gt(args.voc12_root, pack["name"])
            boundary, _ = model(torch.as_tensor(pack["img"][0]).to(args.device))
            keys, cam = read_cam_file(os.path.join(args.sem_seg_cam_dir, pack["name"] + ".npz"), pack["label"],
                                   boundary.shape)
            seeds = torch.from_numpy(np.power(cam, args.np_power)).to(boundary.device)
            maps = {"seeds": seeds}
            if keys.size:
                walk = lambda b: indexing.random_walk(seeds, b, args.rw_radius, args.beta, args.exp_times)
                maps["walk_irn"] = walk(boundary)
                ir = read_index_png(os.path.join(args.ir_label_out_dir, pack["name"] + ".png"), "an IR label PNG")
                for variant, label_map in (("walk_ir_edges", ir), ("walk_gt_edges", gt)):
                    edges = label_edge_boundary(label_map, boundary.shape).to(boundary.device)
                    maps[variant] = walk(edges)
            else:
                maps.update({v: seeds for v in VARIANTS[1:]})
            for variant, walked in maps.items():
                for t in BG_SCORES:
                    pred = walk_to_label(walked, keys, size, t)
                    confusion[(variant, t)] += confusion_matrix([pred], [gt], n_class=21)
    print(f"{len(ids)} images of {args.infer_list}, seeds {args.sem_seg_cam_dir} ** {args.np_power}, "
          f"IRN {args.irn_weights_name}, IR labels {args.ir_label_out_dir}; mIoU (%) per background score:")
    print("variant        " + " ".join(f"{t:>6}" for t in BG_SCORES))
    best = {}
    for variant in VARIANTS:
        row = [scores(confusion[(variant, t)])["miou"] * 100 for t in BG_SCORES]
        best[variant] = max(row)
        print(f"{variant:<14s} " + " ".join(f"{x:6.1f}" for x in row))
    print(" ".join(f"{v}={best[v]:.1f}" for v in VARIANTS))


if __name__ == "__main__":
    main()
