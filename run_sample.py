"""W-OoD driver: the single source of configuration; runs the steps switched on with --<step>_pass.

    python run_sample.py --preset toy --train_cam_pass true --make_cam_pass true --eval_cam_pass true

`--preset paper` gives the paper's configuration (docs/method.md §3-6) on real VOC; `--preset toy` the
same pipeline scaled to ToyVOC on a CPU (data sizes, batch sizes, epochs and iteration counts only:
the method's constants stay). Any flag given on the command line wins over the preset.
"""
import argparse
import datetime
import importlib
import itertools
import json
import math
import os
import random
import re
import sys

import numpy as np

from misc.utils import InputError, error_line, save_json, str2bool

# (switch name, module): the order in which one invocation runs them.
STEPS = [
    ("train_cam", "step.train_cam"),                 # train the in-distribution classifier
    ("mine_ood", "step.mine_ood"),                   # mine hard OoD images from a candidate pool
    ("train_wood", "step.train_wood"),               # W-OoD fine-tuning
    ("make_cam", "step.make_cam"),                   # CAMs (of --make_cam_from: id or wood)
    ("eval_cam", "step.eval_cam"),                   # threshold sweep on --eval_cam_dir
    ("make_advcam", "step.make_advcam"),             # AdvCAM from the W-OoD classifier
    ("eval_advcam", "step.eval_cam"),                # the same evaluation on --advcam_out_dir
    ("cam_to_ir_label", "step.cam_to_ir_label"),     # confident IR labels (dense CRF)
    ("train_irn", "step.train_irn"),
    ("make_sem_seg", "step.make_sem_seg_labels"),    # random walk -> pseudo masks
    ("eval_sem_seg", "step.eval_sem_seg"),
    ("make_ins_seg", "step.make_ins_seg_labels"),    # IRN's instance masks (docs/method.md §9)
    ("eval_ins_seg", "step.eval_ins_seg"),           # their VOC AP50
    ("train_seg", "step.train_seg"),                 # DeepLab-v2 on the pseudo masks (docs/method.md §8)
    ("eval_seg", "step.eval_seg"),                   # its val / test predictions, with and without CRF
]
# Flags of a step's argument group that do not change its outputs, and why. Every other flag of the group must
# change the step's provenance inputs (tests/test_flags.py), so a new flag is never silently left out of them.
OUTPUT_NEUTRAL = {
    "train_cam": {"cam_weights_name": "the output file itself"},
    "mine_ood": {"review_below": "only how many rejected candidates the review page shows"},
    "train_wood": {"wood_weights_name": "the output file itself"},
    "make_cam": {"cam_out_dir": "the output folder itself", "eval_cam_dir": "eval_cam's input",
                 "cam_eval_thres": "eval_cam's sweep", "cpu_jit": "the same maps up to float rounding",
                 "make_cam_batch": "the same maps (images of one size share a forward)"},
    "make_advcam": {"advcam_out_dir": "the output folder itself",
                    "advcam_batch": "the same maps (class-runs of images of one size share a batch)"},
    "cam_to_ir_label": {"ir_label_out_dir": "the output folder itself"},
    "train_irn": {"irn_weights_name": "the output file itself"},
    "make_sem_seg": {"sem_seg_out_dir": "the output folder itself"},
    "make_ins_seg": {"ins_seg_out_dir": "the output folder itself"},
    "train_seg": {"seg_name": "names the output file", "seg_weights_name": "the output file itself",
                  "seg_save_every": "how often a checkpoint is kept; a resumed run ends with the same weights",
                  **{flag: "eval_seg's"
                     for flag in ("seg_eval_list", "seg_test_list", "seg_crf", "seg_crf_real_image")}},
    "eval_seg": {"seg_name": "names the output folders", "seg_eval_list": "which images, not what each becomes",
                 "seg_test_list": "which images, not what each becomes",
                 **{flag: "train_seg's: they reach the predictions through the weights file, recorded by its hash"
                    for flag in ("seg_label_dir", "seg_train_list", "seg_init_weights", "seg_batch_size",
                                 "seg_iter_size", "seg_iter_max", "seg_lr", "seg_momentum", "seg_weight_decay",
                                 "seg_poly_power", "seg_lr_step", "seg_crop_size", "seg_scales", "seg_save_every")}},
}

# Under torchrun (misc/dist.py) these run on rank 0 alone while the others wait: they read files and score
# them (seconds). Every step starts from --seed (_run_steps), so the ranks' generators stay alike after them.
RANK0_STEPS = {"eval_cam", "eval_advcam", "eval_sem_seg", "eval_ins_seg"}

N_VOC_CLASSES = 20
CAM_EVAL_THRES_PAPER = [0.08, 0.09, 0.10, 0.11, 0.12, 0.13, 0.14]

# Values that differ between the presets. Everything else has one default in build_parser().
PRESETS = {
    "paper": dict(
        voc12_root="Data/VOC2012",
        pretrained=os.path.join("sess", "resnet50-19c8e357.pth"),
        work_dir="result/paper",
        # the release's layout and file names (its README steps 1-3): the OoD images unzipped into
        # WOoD_dataset/openimages, the released ID classifier moved into sess/ (train_cam then skips)
        ood_pool_root="WOoD_dataset", ood_pool_list="WOoD_dataset/candidates.txt",
        ood_root="WOoD_dataset/openimages/OoD_images", ood_list="WOoD_dataset/openimages/ood_list.txt",
        cam_weights_name="sess/res50_cam_orig.pth.pth", wood_weights_name="sess/res50_wood.pth",
        irn_weights_name="sess/res50_irn.pth",
        # DeepLab-v2 ResNet-101 from ImageNet: deeplab-pytorch's converted caffe init (or torchvision's
        # resnet101-63fe2227.pth, built with the stride in the 3x3 conv; README "Deviations")
        seg_init_weights=os.path.join("sess", "deeplabv2_resnet101_imagenet_init.pth"),
    ),
    "toy": dict(
        voc12_root="Data/ToyVOC",
        # the toy world's "ImageNet" weights (toy/toynet.py's defaults; the file ships with the project)
        pretrained=os.path.join("sess", "toy", "resnet50_toynet_w16.pth"), backbone_width=16,
        work_dir="result/toy",
        ood_pool_root="WOoD_dataset/toy", ood_pool_list="WOoD_dataset/toy/candidates.txt",
        ood_root="WOoD_dataset/toy", ood_list=None,  # the mined list, <work_dir>/ood_list.txt
        cam_weights_name="sess/toy/res50_cam.pth", wood_weights_name="sess/toy/res50_wood.pth",
        irn_weights_name="sess/toy/res50_irn.pth",
        # sizes scaled from ~500 px VOC images to ~160 px toy images
        cam_resize_long=[100, 200], cam_crop_size=160, ood_long_side=160, irn_crop_size=160,
        # radii on the stride-4 grid scale with it: IRN's 10 of a 128-cell crop -> 3 of 40, the walk's 5 on
        # ~125-cell VOC images -> 2 on ~40-cell toy images (docs/toy.md "The IRN stage on the toy")
        irn_radius=3, rw_radius=2,
        # W-OoD gets the ID classifier's epochs, as in the paper (5 and 5)
        cam_num_epoches=25, wood_num_epoches=25, irn_num_epoches=8,
        cluster_K=8, adv_iter=8, num_workers=2, cpu_threads=1,
        # the toy's ID classifier leans on its cues harder than an ImageNet-started one on VOC (every hard
        # candidate fools it): the OoD push-down needs far more than the paper's 0.25 (docs/toy.md "The cue's
        # reach and W-OoD's weight on the toy"); 4.0 at the paper's learning rate overshot and diverged on some
        # seeds, a quarter of that rate trains on every seed, and there 8.0 gains more than 4.0 (docs/toy.md)
        ood_coeff=8.0, wood_learning_rate=0.025,
        cam_eval_thres=[round(0.05 * i, 2) for i in range(1, 13)],
        select_eval_thres=[round(0.05 * i, 2) for i in range(1, 13)],
        # DeepLab-v2 on the ToyNet ResNet-50 (same head and recipe; README "Deviations"); the crop scaled as
        # the images (321 of ~500 px -> 97 of ~144 px), iterations to ~2-3 minutes on 2 cores
        seg_init_weights=os.path.join("sess", "toy", "resnet50_toynet_w16.pth"), seg_width=16,
        seg_crop_size=97, seg_iter_max=60, seg_save_every=20,
    ),
}


# ------------------------------------------------------------------------------------------- flag types
# Each flag's range lives in its type: argparse checks it where the flag is declared, before any work.

def _number(kind, ok, expected):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text}: must be {expected}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text}: must be {expected}")
        return value
    parse.__name__ = expected  # what argparse names in its own messages
    return parse


positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
natural = _number(int, lambda v: v >= 0, "an integer >= 0")
positive = _number(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
non_negative = _number(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
fraction = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
class_index = _number(int, lambda v: 0 <= v < N_VOC_CLASSES, f"a class index in 0-{N_VOC_CLASSES - 1}")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are the driver's one line (InputError: `error: --flag value: must be ...`)."""

    def error(self, message):
        flag = re.match(r"argument (--\w+)(?:/\S+)?: (.*)$", message)
        raise InputError(f"{flag.group(1)} {flag.group(2)}" if flag else message)


def build_parser():
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    B = str2bool
    g = p.add_argument_group("general")
    g.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    g.add_argument("--num_workers", type=natural, default=8, help="data-loader workers / process-pool size")
    g.add_argument("--work_dir", default=None, help="config, log, summary.json and step outputs go here")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--cpu_threads", type=natural, default=0,
                   help="torch intra-op threads per process on CPU (0: torch's default). With data-loader "
                        "workers or other jobs on a small CPU, 1 avoids oversubscription (10x measured)")
    g.add_argument("--allow_tf32", type=B, default=False,
                   help="let CUDA convolutions use TF32 (faster on Ampere+, but shifts CAM values ~1e-3)")
    g.add_argument("--amp", choices=["none", "bf16"], default="none",
                   help="make_cam / make_advcam forward passes under bfloat16 autocast (reductions stay float32; "
                        "CAMs within the tolerance of README's Deviations, bench/advcam_speed.py)")
    g.add_argument("--train_amp", choices=["none", "bf16"], default="none",
                   help="train_cam / train_wood / train_irn / train_seg forward passes under bfloat16 autocast "
                        "(losses float32; not the paper's recipe: README \"Deviations\")")
    g.add_argument("--channels_last", type=B, default=False,
                   help="make_cam / make_advcam feed the net NHWC tensors (faster convolutions on GPUs, same maths)")
    g.add_argument("--voc12_root", default=None, help="VOC2012 devkit folder + SegmentationClassAug")
    g.add_argument("--train_list", default="train_aug", help="split name (train/val/train_aug) or list file")
    g.add_argument("--val_list", default="val")
    g.add_argument("--infer_list", default="train", help="images for make_cam/advcam/IR labels/random walk")
    g.add_argument("--chainer_eval_set", default="train", help="images the eval steps score")
    g.add_argument("--eval_name", default=None, help="summary.json entry name (default: evaluated folder)")
    g.add_argument("--deterministic", type=B, default=False,
                   help="deterministic CUDA algorithms (cuDNN, cuBLAS, and replacements for the two ops without "
                        "one): a resumed or repeated GPU run gives the same weights; slower (README)")
    g.add_argument("--dist_timeout", type=positive, default=120,
                   help="minutes a torchrun process waits for the others (at a barrier: rank 0 runs the evaluations "
                        "alone) before the run stops")
    g.add_argument("--overwrite", type=B, default=False,
                   help="recompute outputs made by other inputs (misc/provenance.py) instead of stopping")

    g = p.add_argument_group("backbone")
    g.add_argument("--pretrained", default=None,
                   help="torchvision-format ResNet-50 weights (path or URL: ImageNet, or ToyVOC's ToyNet file of "
                        "toy/toynet.py), or 'none' (train the ID classifier from scratch)")
    g.add_argument("--backbone", choices=["resnet50", "resnet101"], default="resnet50",
                   help="the classifiers' and IRN's backbone (net/resnet.py BACKBONES); resnet50 is the paper's, "
                        "resnet101 needs its own --pretrained file (sess/resnet101-63fe2227.pth, downloaded)")
    g.add_argument("--backbone_width", type=positive_int, default=64, help="64 = the real ResNet-50")
    g.add_argument("--real_momentum", type=non_negative, default=None,
                   help="use this SGD momentum instead of the original's 1e-4 quirk (Deviations)")

    g = p.add_argument_group("train_cam: the ID classifier (docs/method.md §4.1)")
    g.add_argument("--cam_batch_size", type=positive_int, default=16)
    g.add_argument("--cam_num_epoches", type=positive_int, default=5)
    g.add_argument("--cam_learning_rate", type=positive, default=0.1)
    g.add_argument("--cam_weight_decay", type=non_negative, default=1e-4)
    g.add_argument("--cam_crop_size", type=positive_int, default=512)
    g.add_argument("--cam_resize_long", type=positive, nargs=2, default=[320, 640])
    g.add_argument("--cam_weights_name", default=None, help="ID classifier weights (written by train_cam)")

    g = p.add_argument_group("make_cam / eval_cam (docs/method.md §4.4, 4.5)")
    g.add_argument("--cam_scales", type=positive, nargs="+", default=[1.0, 0.5, 1.5, 2.0])
    g.add_argument("--make_cam_from", choices=["id", "wood"], default="wood",
                   help="which classifier make_cam uses: the ID classifier or the W-OoD one")
    g.add_argument("--cam_out_dir", default=None, help="default <work_dir>/<make_cam_from>_cam (wood_cam, id_cam)")
    g.add_argument("--eval_cam_dir", default=None, help="what eval_cam scores (default --cam_out_dir)")
    g.add_argument("--cam_eval_thres", type=fraction, nargs="+", default=CAM_EVAL_THRES_PAPER)
    g.add_argument("--cpu_jit", type=B, default=True,
                   help="on CPU, run make_cam's net as a frozen TorchScript graph (BN folded, fused ReLU): "
                        "the same CAMs up to float rounding, faster (bench/make_cam.py); not with --amp bf16")
    g.add_argument("--make_cam_batch", type=positive_int, default=1,
                   help="images of one size that share make_cam's forward per scale (on a GPU; same CAMs)")

    g = p.add_argument_group("mine_ood (docs/method.md §4.2)")
    g.add_argument("--ood_pool_root", default=None, help="folder of candidate OoD images")
    g.add_argument("--ood_pool_list", default=None, help="candidate paths relative to --ood_pool_root")
    g.add_argument("--mine_th", type=fraction, default=0.5, help="keep candidates with max sigmoid > this")
    g.add_argument("--mine_max_keep", type=positive_int, default=None, help="cap on the number kept")
    g.add_argument("--mine_exclude", default=None, help="file of candidate paths rejected by a human")
    g.add_argument("--review_below", type=natural, default=50,
                   help="candidates below --mine_th shown greyed on the review page <work_dir>/ood_review.html")

    g = p.add_argument_group("train_wood (docs/method.md §4.3)")
    g.add_argument("--ood_root", default=None)
    g.add_argument("--wood_weights_name", default=None, help="W-OoD classifier weights (written by train_wood)")
    g.add_argument("--ood_list", default=None, help="hard OoD paths relative to --ood_root "
                                                     "(default <work_dir>/ood_list.txt, written by mine_ood)")
    g.add_argument("--ood_long_side", type=positive_int, default=500, help="OoD resize for prototypes and mining")
    g.add_argument("--wood_batch_size", type=positive_int, default=16)
    g.add_argument("--ood_batch_size", type=positive_int, default=16)
    g.add_argument("--wood_num_epoches", type=positive_int, default=5)
    g.add_argument("--wood_learning_rate", type=positive, default=0.1)
    g.add_argument("--wood_weight_decay", type=non_negative, default=1e-4)
    g.add_argument("--cluster_K", type=positive_int, default=50)
    g.add_argument("--kmeans_iter", type=positive_int, default=10)
    g.add_argument("--distance_lambda", type=non_negative, default=0.007)
    g.add_argument("--ood_dist_topk", type=fraction, default=0.2, help="tau of the OoD distance selection")
    g.add_argument("--ood_coeff", type=non_negative, default=0.25)
    g.add_argument("--ood_adv_step", type=non_negative, default=0.07, help="anti-adversarial step on OoD images")
    g.add_argument("--ood_mask_class", type=class_index, default=4, help="OoD images whose arg-max is this are "
                                                                  "masked out (4 = bottle, as released)")
    g.add_argument("--select_by_gt", type=B, default=True,
                   help="released code: keep the weights with the best train-set CAM mIoU (uses GT)")
    g.add_argument("--select_scales", type=positive, nargs="+", default=[0.5, 1.0, 1.5, 2.0])
    g.add_argument("--select_eval_thres", type=fraction, nargs="+", default=[0.06, 0.08, 0.10, 0.12])
    g.add_argument("--select_every", type=positive_int, default=10)
    g.add_argument("--select_accumulate", type=B, default=True,
                   help="released code: the selection's confusion matrix accumulates over the thresholds "
                        "(score at t = predictions of every threshold up to t); false: one per threshold")
    g.add_argument("--select_before_update", type=B, default=True,
                   help="released code: an in-epoch evaluation scores the weights before that step's update; "
                        "false: after it")
    g.add_argument("--wood_empty_cluster", choices=["keep"], default="keep",
                   help="an empty K-means cluster keeps its centroid (the original divides by zero)")

    g = p.add_argument_group("make_advcam (docs/method.md §4.6)")
    g.add_argument("--make_advcam_from", choices=["id", "wood"], default="wood")
    g.add_argument("--adv_iter", type=positive_int, default=27)
    g.add_argument("--AD_coeff", type=non_negative, default=7.0)
    g.add_argument("--AD_stepsize", type=positive, default=0.08)
    g.add_argument("--score_th", type=fraction, default=0.5, help="mask threshold of the AD regulariser")
    g.add_argument("--advcam_batch", type=positive_int, default=1,
                   help="images of one size whose class-runs share a batch (on a GPU; same numbers, more memory)")
    g.add_argument("--advcam_out_dir", default=None,
                   help="default <work_dir>/<make_advcam_from>_advcam (wood_advcam, id_advcam)")

    g = p.add_argument_group("cam_to_ir_label (docs/method.md §5.1)")
    g.add_argument("--ir_label_cam_dir", default=None, help="seeds for IR labels (default --advcam_out_dir)")
    g.add_argument("--conf_fg_thres", type=fraction, default=0.30)
    g.add_argument("--conf_bg_thres", type=fraction, default=0.15)
    g.add_argument("--ir_label_out_dir", default=None, help="default <work_dir>/ir_label")

    g = p.add_argument_group("train_irn (docs/method.md §5.2)")
    g.add_argument("--irn_crop_size", type=positive_int, default=512)
    g.add_argument("--irn_batch_size", type=positive_int, default=32)
    g.add_argument("--irn_num_epoches", type=positive_int, default=3)
    g.add_argument("--irn_learning_rate", type=positive, default=0.1)
    g.add_argument("--irn_weight_decay", type=non_negative, default=1e-4)
    g.add_argument("--irn_radius", type=positive_int, default=10, help="search radius on the label grid")
    g.add_argument("--irn_weights_name", default=None, help="IRN weights (written by train_irn)")

    g = p.add_argument_group("make_sem_seg / eval_sem_seg (docs/method.md §5.3, 5.4)")
    g.add_argument("--sem_seg_cam_dir", default=None, help="seeds of the random walk "
                                                            "(default --ir_label_cam_dir)")
    g.add_argument("--beta", type=positive_int, default=10)
    g.add_argument("--exp_times", type=positive_int, default=8)
    g.add_argument("--rw_radius", type=positive_int, default=5)
    g.add_argument("--sem_seg_bg_thres", type=fraction, default=0.22)
    g.add_argument("--np_power", type=positive, default=1.5)
    g.add_argument("--sem_seg_out_dir", default=None, help="default <work_dir>/pseudo_mask")

    g = p.add_argument_group("make_ins_seg / eval_ins_seg: IRN's instance masks (docs/method.md §9)",
                             "the CAMs of --sem_seg_cam_dir (no --np_power) and make_sem_seg's walk (--rw_radius, "
                             "--beta, --exp_times)")
    g.add_argument("--ins_seg_bg_thres", type=fraction, default=0.25)
    g.add_argument("--ins_seg_centroid_iterations", type=positive_int, default=300,
                   help="steps of every cell along the displacement field")
    g.add_argument("--ins_seg_cluster_thres", type=positive, default=2.5,
                   help="cells with a displacement shorter than this are instance centres")
    g.add_argument("--ins_seg_fragment_fraction", type=fraction, default=0.01,
                   help="a detection smaller than this fraction of the image scores 0")
    g.add_argument("--ins_seg_out_dir", default=None, help="default <work_dir>/ins_seg")

    g = p.add_argument_group("train_seg / eval_seg: DeepLab-v2 on the pseudo masks (docs/method.md §8)")
    g.add_argument("--seg_name", default="deeplab",
                   help="names this segmentation run: <work_dir>/<name>.pth, <name>_<split> folders, summary rows")
    g.add_argument("--seg_label_dir", default=None, help="training labels <id>.png (default --sem_seg_out_dir; "
                                                         "<voc12_root>/SegmentationClassAug: the upper bound)")
    g.add_argument("--seg_train_list", default="train_aug")
    g.add_argument("--seg_init_weights", default=None,
                   help="ImageNet init: deeplab-pytorch layout or torchvision ResNet file, or 'none'")
    g.add_argument("--seg_width", type=positive_int, default=64, help="64 = the real ResNet-101")
    g.add_argument("--seg_weights_name", default=None, help="trained weights (default <work_dir>/<seg_name>.pth)")
    g.add_argument("--seg_batch_size", type=positive_int, default=5)
    g.add_argument("--seg_iter_size", type=positive_int, default=2, help="sub-batches accumulated per update")
    g.add_argument("--seg_iter_max", type=positive_int, default=20000, help="updates")
    g.add_argument("--seg_lr", type=positive, default=2.5e-4)
    g.add_argument("--seg_momentum", type=non_negative, default=0.9)
    g.add_argument("--seg_weight_decay", type=non_negative, default=5e-4)
    g.add_argument("--seg_poly_power", type=positive, default=0.9)
    g.add_argument("--seg_lr_step", type=positive_int, default=10,
                   help="the poly lr is updated every this many updates")
    g.add_argument("--seg_crop_size", type=positive_int, default=321)
    g.add_argument("--seg_scales", type=positive, nargs="+", default=[0.5, 0.75, 1.0, 1.25, 1.5])
    g.add_argument("--seg_save_every", type=positive_int, default=1000, help="checkpoint every this many updates")
    g.add_argument("--seg_eval_list", default="val", help="scored with and without CRF")
    g.add_argument("--seg_test_list", default="test",
                   help="predicted in the VOC server layout when its list and images exist")
    g.add_argument("--seg_crf", type=B, default=True, help="also the dense CRF of deeplab-pytorch")
    g.add_argument("--seg_crf_real_image", type=B, default=False,
                   help="CRF on the real RGB image instead of deeplab-pytorch's mean-subtracted BGR cast to "
                        "uint8 (README \"Deviations\")")

    g = p.add_argument_group("steps to run")
    for name, _ in STEPS:
        g.add_argument(f"--{name}_pass", type=B, default=False, metavar="true|false")
    return p


def parse_args(argv=None):
    """Parse twice: first the preset, then everything with the preset's values as defaults."""
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    parser.set_defaults(**PRESETS[known.preset])
    args = parser.parse_args(argv)
    resolve_defaults(args)
    return args


def resolve_defaults(args):
    """Fill the defaults that derive from other flags (all in one place)."""
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    w = args.work_dir
    # named after what is computed: the ID classifier's CAMs never default to a W-OoD folder
    args.cam_out_dir = args.cam_out_dir or os.path.join(w, f"{args.make_cam_from}_cam")
    args.eval_cam_dir = args.eval_cam_dir or args.cam_out_dir
    args.advcam_out_dir = args.advcam_out_dir or os.path.join(w, f"{args.make_advcam_from}_advcam")
    args.ir_label_cam_dir = args.ir_label_cam_dir or args.advcam_out_dir
    args.sem_seg_cam_dir = args.sem_seg_cam_dir or args.ir_label_cam_dir
    args.ir_label_out_dir = args.ir_label_out_dir or os.path.join(w, "ir_label")
    args.sem_seg_out_dir = args.sem_seg_out_dir or os.path.join(w, "pseudo_mask")
    args.ins_seg_out_dir = args.ins_seg_out_dir or os.path.join(w, "ins_seg")
    args.ood_list = args.ood_list or os.path.join(w, "ood_list.txt")
    args.seg_label_dir = args.seg_label_dir or args.sem_seg_out_dir
    args.seg_weights_name = args.seg_weights_name or os.path.join(w, args.seg_name + ".pth")


def check_device(name):
    """InputError unless `name` is a torch device this machine has."""
    import torch
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {name} is not a device: use cpu, cuda or cuda:<index>") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: this PyTorch build or machine has no usable CUDA GPU; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif device.type != "cpu" and not getattr(torch, device.type, None):
        raise InputError(f"--device {name}: this PyTorch has no {device.type} backend; use cpu or cuda")


def validate_args(args):
    """One line (InputError) for a combination of flags that cannot be right, before any step runs (each flag's
    own range is checked by its type in build_parser)."""
    if args.conf_bg_thres > args.conf_fg_thres:
        raise InputError(f"--conf_bg_thres {args.conf_bg_thres} is above --conf_fg_thres {args.conf_fg_thres}: "
                         f"the background threshold must not exceed the foreground one")
    check_device(args.device)


def use_device(device):
    """Make `device` the current CUDA device (--device cuda:1 in one process), so that what opens a CUDA context
    by itself (the loaders' pin-memory thread, bf16 checks) opens it there and not on GPU 0."""
    import torch
    if torch.device(device).type == "cuda" and torch.device(device).index is not None:
        torch.cuda.set_device(device)


def seed_everything(seed):
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_precision(allow_tf32):
    """Full float32 by default: the original ran on GPUs without TF32, and AdvCAM amplifies differences."""
    import torch
    torch.backends.cudnn.allow_tf32 = allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32


class _Tee:
    """Copy what the steps print to the run's log file."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text):
        self.stream.write(text)
        self.log.write(text)
        self.log.flush()

    def flush(self):
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def new_config_path(work_dir, stamp):
    """config-<stamp>.json, or config-<stamp>-<n>.json if a run of the same second took it (reserved
    with an exclusive create, so concurrent runs never share one)."""
    for n in itertools.count(1):
        path = os.path.join(work_dir, f"config-{stamp}.json" if n == 1 else f"config-{stamp}-{n}.json")
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return path
        except FileExistsError:
            continue


# the batch sizes each training step splits over torchrun's processes
SPLIT_BATCHES = {"train_cam": ["cam_batch_size"], "train_wood": ["wood_batch_size", "ood_batch_size"],
                 "train_irn": ["irn_batch_size"]}


def check_distributed(args, dist):
    """InputError if a switched-on step cannot run on dist.world() processes (every step splits its work)."""
    if dist.world() == 1:
        return
    for step, flags in SPLIT_BATCHES.items():
        if getattr(args, f"{step}_pass"):
            for flag in flags:
                dist.per_rank(getattr(args, flag), f"--{flag}")
    if args.train_seg_pass and args.seg_batch_size < dist.world():
        raise InputError(f"--seg_batch_size {args.seg_batch_size} is below the {dist.world()} processes: every "
                         f"process takes at least one image of each sub-batch")
    if args.train_cam_pass and str(args.pretrained).lower() == "none":
        raise InputError("--pretrained none trains BatchNorm on batch statistics, which would then be each "
                         "process's part of the batch: run train_cam from scratch with one process")


def main(argv=None):
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if not main_rank:
        os.environ["TQDM_DISABLE"] = "1"   # one progress bar (rank 0's); tqdm reads it when imported
    from misc import dist  # torch.distributed; imported late: the parser works without torch
    try:
        args = parse_args(argv)
    except InputError as e:
        if main_rank:
            print(f"error: {e}", file=sys.stderr)
        return 2
    from misc.torchutils import use_deterministic
    use_deterministic(args.deterministic)  # before anything starts cuBLAS
    try:
        args.device = dist.init(args.device, args.dist_timeout)
    except InputError as e:  # this rank's own problem (its GPU): every rank says it
        print(f"error (rank {os.environ.get('RANK', '0')}): {e}", file=sys.stderr)
        return 2
    try:
        validate_args(args)
        check_distributed(args, dist)
        if not any(getattr(args, f"{name}_pass") for name, _ in STEPS):
            raise InputError("no step is switched on: pass --<step>_pass true for the steps to run, e.g. "
                             "--train_cam_pass true (bash_run_sample.sh runs them all)")
    except InputError as e:
        if main_rank:
            print(f"error: {e}", file=sys.stderr)
        dist.close()
        return 2
    try:
        return _run_steps(args, dist)
    finally:
        dist.close()


def run_step(name, args):
    """Run the step `name` of STEPS on `args` (a driver namespace), as the driver does (benches time a step
    this way: nothing but the driver imports a step)."""
    return importlib.import_module(dict(STEPS)[name]).run(args)


def _run_steps(args, dist):
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    if dist.is_main():
        os.makedirs(args.work_dir, exist_ok=True)
        save_json(new_config_path(args.work_dir, stamp), {**vars(args), "world_size": dist.world()})
        log = open(os.path.join(args.work_dir, "run.log"), "a")
        sys.stdout = _Tee(sys.stdout, log)
    else:  # the other ranks print nothing but their errors
        log = open(os.devnull, "w")
        sys.stdout = _Tee(open(os.devnull, "w"), log)
    dist.barrier()
    print(f"== run_sample.py {stamp} on {dist.world()} process(es), config: " + json.dumps(vars(args), sort_keys=True))
    use_device(args.device)
    set_precision(args.allow_tf32)
    if args.cpu_threads:
        import torch
        torch.set_num_threads(args.cpu_threads)
    where = f" (rank {dist.rank()} of {dist.world()})" if dist.world() > 1 else ""
    name = None
    try:
        for name, module in STEPS:
            if not getattr(args, f"{name}_pass"):
                continue
            try:
                step = importlib.import_module(module)
            except ModuleNotFoundError as e:
                if e.name != module:
                    raise
                raise InputError(f"step {name} ({module.replace('.', '/')}.py) is not implemented yet; "
                                 f"run with --{name}_pass false") from None
            print(f"== step {name}")
            # each step draws from the seed itself, not from what the steps before it in this call drew:
            # a step gives the same result run alone, in a stage, or after a resume that skipped earlier steps
            seed_everything(args.seed)
            started = datetime.datetime.now()
            if name in RANK0_STEPS and not dist.is_main():
                pass
            elif name == "eval_advcam":
                step.run(argparse.Namespace(**{**vars(args), "eval_cam_dir": args.advcam_out_dir}))
            else:
                step.run(args)
            dist.barrier()
            print(f"== step {name} done in {(datetime.datetime.now() - started).total_seconds():.1f} s")
    except InputError as e:
        print(f"error{where}: {error_line(e)}", file=sys.stderr)
        log.write(f"error: {error_line(e)}\n")
        return 2
    except KeyboardInterrupt:
        if name is not None and name.startswith("train_"):
            print(f"interrupted during {name}: nothing of it was saved, and it restarts from its first epoch "
                  f"when the same command is run again; outputs of the steps before it are kept", file=sys.stderr)
        else:
            print("interrupted: finished outputs are kept; run the same command again to resume",
                  file=sys.stderr)
        log.write("interrupted\n")
        return 130
    finally:
        sys.stdout = sys.stdout.stream
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
