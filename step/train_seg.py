"""Train DeepLab-v2 on the pseudo masks (docs/method.md §8), deeplab-pytorch's `main.py train` (configs/voc12.yaml).

Reads the images of --seg_train_list and their labels `<seg_label_dir>/<id>.png` (the pseudo masks by default;
SegmentationClassAug gives the fully supervised upper bound with the same code) and the ImageNet init
--seg_init_weights; trains with deeplab-pytorch's recipe (augmentation in voc12/segmentation.py, loss and
parameter groups in net/deeplab_v2.py). Writes --seg_weights_name (deeplab-pytorch's MSC key layout) with its
provenance record. Resumable: a checkpoint `<seg_weights_name>.ckpt` every --seg_save_every updates, and the
sample stream depends on (seed, sample index) only, so a resumed run ends with the weights of an uninterrupted
one. A non-finite loss stops the step before the update (the last checkpoint stays good).
"""
import json
import os
import time

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from misc import dist, provenance, steptools
from misc.torchutils import precision_context, require_finite
from misc.utils import InputError, load_torch, save_torch
from net.deeplab_v2 import N_CLASSES, deeplab_v2, msc_loss, msc_state_dict, param_groups, set_lrs
from voc12.dataloader import load_img_name_list, require_images
from voc12.segmentation import SegTrainStream


def rank_sub_batches(n_samples, start, batch_size):
    """The stream indices (0-based from `start`) of this rank's images, one list per sub-batch: of each
    sub-batch of `batch_size` consecutive samples, the rows rank, rank + world, ... (misc/dist.py)."""
    for first in range(0, n_samples - start, batch_size):
        yield dist.rows(list(range(first, min(first + batch_size, n_samples - start))))


def checkpoint_path(weights_name):
    return weights_name + ".ckpt"


def provenance_inputs(args):
    """What decides the trained network (misc/provenance.py): init weights, labels, list, recipe, seed."""
    ids = load_img_name_list(args.voc12_root, args.seg_train_list)
    init = None if str(args.seg_init_weights).lower() == "none" else args.seg_init_weights
    return {"init": provenance.file_digest(init), "label_dir": os.path.normpath(args.seg_label_dir),
            "labels": provenance.folder_identity(args.seg_label_dir), "train_list": provenance.list_digest(ids),
            **provenance.flag_values(args, ["seg_width", "seg_batch_size", "seg_iter_size", "seg_iter_max", "seg_lr",
                                            "seg_momentum", "seg_weight_decay", "seg_poly_power", "seg_lr_step",
                                            "seg_crop_size", "seg_scales", "seed"]),
            **provenance.non_default_flags(args, {"train_amp": "none"})}


def _suspects(args):
    return {"--seg_lr": args.seg_lr}


def build_model(args, log=print):
    init = None if str(args.seg_init_weights).lower() == "none" else args.seg_init_weights
    return deeplab_v2(N_CLASSES, init, width=args.seg_width, log=log)


def run(args):
    device = torch.device(args.device)
    ids = load_img_name_list(args.voc12_root, args.seg_train_list)
    inputs = provenance_inputs(args)
    if steptools.keep_existing(args.seg_weights_name, "train_seg", inputs, args, "--seg_weights_name"):
        return
    require_images(args.voc12_root, ids)
    steptools.require_files(args.seg_label_dir, ids, ".png", "label PNGs of --seg_train_list",
                            "run make_sem_seg with --infer_list covering --seg_train_list (or give "
                            "--seg_label_dir SegmentationClassAug for the upper bound)")
    recorded = json.dumps(inputs, sort_keys=True)  # a checkpoint resumes only the run of these inputs

    model = build_model(args).to(device)
    model.train()
    optimizer = torch.optim.SGD(param_groups(model, args.seg_lr, args.seg_weight_decay), lr=args.seg_lr,
                                momentum=args.seg_momentum)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    ckpt_path, done = checkpoint_path(args.seg_weights_name), 0
    if os.path.exists(ckpt_path) and not args.overwrite:  # --overwrite: start over, replacing it
        ckpt = load_torch(ckpt_path, what="a train_seg checkpoint")
        if ckpt.get("inputs") != recorded:
            raise InputError(f"{ckpt_path} is a checkpoint of another run (other labels, list, init or flags): "
                             f"delete it, give another --seg_weights_name, or pass --overwrite true to start over")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"])
        done = int(ckpt["update"])
        print(f"train_seg: resuming from {ckpt_path} after update {done}")
    set_lrs(optimizer, base_lrs, done, args.seg_iter_max, args.seg_poly_power, args.seg_lr_step)

    per_update = args.seg_batch_size * args.seg_iter_size
    stream = SegTrainStream(args.voc12_root, ids, args.seg_label_dir, args.seed, args.seg_iter_max * per_update,
                            done * per_update, args.seg_scales, args.seg_crop_size)
    # each rank reads (and augments) only its images of every sub-batch
    loader = iter(DataLoader(stream, batch_sampler=list(rank_sub_batches(len(stream) + stream.start, stream.start,
                                                                         args.seg_batch_size)),
                             num_workers=args.num_workers, pin_memory=device.type == "cuda"))
    print(f"train_seg: {len(ids)} images from {args.seg_label_dir}, updates {done}..{args.seg_iter_max}, "
          f"{per_update} images each, crop {args.seg_crop_size}")
    progress = tqdm(range(done + 1, args.seg_iter_max + 1), desc="train_seg", initial=done,
                    total=args.seg_iter_max, dynamic_ncols=True)
    started, seen = time.perf_counter(), 0
    for update in progress:
        optimizer.zero_grad()
        total = 0.0
        for _ in range(args.seg_iter_size):
            images, labels = next(loader)
            with precision_context(device, args.train_amp):
                outputs = model(images.to(device))
            loss = msc_loss([o.float() for o in outputs], labels, args.seg_iter_size)
            whole = dist.total(loss.detach())  # the whole sub-batch's loss
            # stopped before the update: the last checkpoint stays good
            require_finite("train_seg", 1, update, _suspects(args), loss=whole)
            loss.backward()
            total += whole.item()
            seen += args.seg_batch_size  # the whole sub-batch, all ranks (the stream is whole updates)
        dist.sum_gradients(model.parameters())
        optimizer.step()
        set_lrs(optimizer, base_lrs, update, args.seg_iter_max, args.seg_poly_power, args.seg_lr_step)
        progress.set_postfix(loss=f"{total:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.3g}",
                             img_s=f"{seen / (time.perf_counter() - started):.2f}")
        if update % args.seg_save_every == 0 and update < args.seg_iter_max and dist.is_main():
            save_torch(ckpt_path, {"model": msc_state_dict(model), "optimizer": optimizer.state_dict(),
                                   "update": torch.tensor(update), "torch_rng": torch.get_rng_state(),
                                   "inputs": recorded})
    progress.close()
    steptools.save_trained(args.seg_weights_name, msc_state_dict(model), "train_seg", inputs, _suspects(args), 1)
    if dist.is_main() and os.path.exists(ckpt_path):
        os.remove(ckpt_path)
    print(f"train_seg: {seen / (time.perf_counter() - started):.2f} images/s")
