"""Train DeepLab-v2 on the pseudo masks (SPEC 8), deeplab-pytorch's `main.py train` with configs/voc12.yaml.

Images of args.seg_train_list (train_aug), labels `<seg_label_dir>/<id>.png` (the pipeline's pseudo masks
by default; SegmentationClassAug gives the fully supervised upper bound with the same code). Per image:
scale chosen from args.seg_scales (image bilinear, label nearest), pad bottom/right to the crop with the
mean colour / 255, random crop, random flip, BGR mean subtraction. Batch args.seg_batch_size x
args.seg_iter_size accumulated sub-batches per update; loss = cross-entropy (ignore 255) summed over the
4 MSC outputs against nearest-resized labels, / iter_size. SGD momentum 0.9: backbone convolutions (lr,
wd), ASPP weights (10 lr, wd), ASPP biases (20 lr, no wd); poly lr set every args.seg_lr_step updates.

Resumable: every args.seg_save_every updates a checkpoint (weights, optimizer, update count, torch RNG)
is written atomically to `<seg_weights_name>.ckpt`; a re-run continues from it. The sample stream (image
order and augmentation draws) is a pure function of (seed, sample index), so a resumed run sees the same
batches as an uninterrupted one and ends with the same weights. Final weights (deeplab-pytorch's MSC key
layout) go to args.seg_weights_name; the step is skipped when that file exists and its provenance record
matches (misc/provenance.py); a checkpoint is resumed only by a run of the same inputs.
"""
import json
import os
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from misc import dist, provenance
from misc.imutils import read_rgb
from misc.torchutils import precision_context
from misc.utils import InputError, load_torch, require_dir, save_torch
from net.deeplab_v2 import MEAN_BGR, deeplab_v2, msc_state_dict
from voc12.dataloader import img_path, load_img_name_list, read_index_png, require_images

IGNORE = 255
N_CLASSES = 21
GROUP_LR_MULT = (1, 10, 20)        # backbone convolutions, ASPP weights, ASPP biases
GROUP_DECAYS = (True, True, False)  # ASPP biases have no weight decay


# ------------------------------------------------------------------------------------------- data

def read_bgr(voc12_root, img_id):
    """The image as cv2.imread gives it, as float32: (H, W, 3) BGR."""
    return np.ascontiguousarray(read_rgb(img_path(voc12_root, img_id))[:, :, ::-1], dtype=np.float32)


def resize_bilinear(image, size):
    """(H, W, C) float32 to `size` = (h, w), bilinear with half-pixel centres and no anti-aliasing: cv2's
    INTER_LINEAR rule (torch computes it in float32; cv2 rounds its weights to 11 bits, a ~1e-3 difference)."""
    if tuple(size) == image.shape[:2]:
        return image
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
    out = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


def resize_label_nearest(label, size):
    """(H, W) label map to `size` = (h, w) with PIL nearest."""
    return np.asarray(Image.fromarray(np.asarray(label, dtype=np.uint8)).resize((size[1], size[0]),
                                                                                Image.Resampling.NEAREST))


def augment(image, label, rng, scales, crop_size, mean=MEAN_BGR):
    """deeplab-pytorch's VOC `_augmentation` then mean subtraction, drawing from `rng` (random.Random).

    image (H, W, 3) float32 BGR, label (H, W) uint8 -> (3, crop, crop) float32, (crop, crop) int64.
    """
    h, w = label.shape
    scale = rng.choice(scales)
    h, w = int(h * scale), int(w * scale)
    image = resize_bilinear(image, (h, w))
    label = resize_label_nearest(label, (h, w)).astype(np.int64)
    pad_h, pad_w = max(crop_size - h, 0), max(crop_size - w, 0)
    if pad_h or pad_w:  # bottom / right, mean colour and ignore label
        image = np.concatenate([image, np.broadcast_to(np.asarray(mean, np.float32), (h, pad_w, 3))], axis=1)
        image = np.concatenate([image, np.broadcast_to(np.asarray(mean, np.float32),
                                                       (pad_h, w + pad_w, 3))], axis=0)
        label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=IGNORE)
    h, w = label.shape
    top, left = rng.randint(0, h - crop_size), rng.randint(0, w - crop_size)
    image = image[top:top + crop_size, left:left + crop_size]
    label = label[top:top + crop_size, left:left + crop_size]
    if rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    image = (image - np.asarray(mean, np.float32)).transpose(2, 0, 1)
    return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(label)


class SegTrainStream(Dataset):
    """The training samples as one stream: sample k (0-based, over all updates) is image
    perm_e[k % n] of epoch e = k // n, augmented with a generator seeded by (seed, k).

    `start` skips the first samples (resume); the stream is the same whatever the workers.
    """

    def __init__(self, voc12_root, ids, label_dir, seed, n_samples, start, scales, crop_size):
        self.voc12_root, self.ids, self.label_dir = voc12_root, ids, label_dir
        self.seed, self.n_samples, self.start = seed, n_samples, start
        self.scales, self.crop_size = tuple(scales), crop_size
        self._perms = {}

    def __len__(self):
        return self.n_samples - self.start

    def image_index(self, k):
        epoch, pos = divmod(k, len(self.ids))
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.ids))}
        return int(self._perms[epoch][pos])

    def __getitem__(self, j):
        k = self.start + j
        img_id = self.ids[self.image_index(k)]
        path = os.path.join(self.label_dir, img_id + ".png")
        label = read_index_png(path, "a label PNG (class values)")
        if ((label >= N_CLASSES) & (label != IGNORE)).any():
            raise InputError(f"{path} has values outside 0..{N_CLASSES - 1} and {IGNORE}: not a VOC label map")
        rng = random.Random(int(np.random.SeedSequence([self.seed, k]).generate_state(1)[0]))
        image, label = augment(read_bgr(self.voc12_root, img_id), label, rng, self.scales, self.crop_size)
        return torch.from_numpy(image), torch.from_numpy(label)


# ------------------------------------------------------------------------------------------ maths

def resize_labels(labels, size):
    """(B, H, W) int labels -> (B, h, w) int64, PIL nearest per map (deeplab-pytorch's resize_labels; it
    passes (H, W) where PIL expects (width, height), which only matters for non-square crops)."""
    return torch.from_numpy(np.stack([resize_label_nearest(l.numpy(), size) for l in labels.cpu()])
                            .astype(np.int64))


def msc_loss(outputs, labels, iter_size):
    """Sum over the MSC outputs of CE(ignore 255) against the labels resized to each output, / iter_size.

    Under torchrun `labels` are this rank's images of the sub-batch: each CE is then this rank's pixels'
    sum over the sub-batch's labelled pixel count (all ranks'), and the ranks' losses add up to the loss of
    the whole sub-batch (misc/dist.py)."""
    total = 0
    for logit in outputs:
        target = resize_labels(labels, logit.shape[2:]).to(logit.device)
        if dist.world() == 1:
            total = total + F.cross_entropy(logit, target, ignore_index=IGNORE)
        else:
            labelled = dist.total((target != IGNORE).sum())
            total = total + F.cross_entropy(logit, target, ignore_index=IGNORE, reduction="sum") / labelled
    return total / iter_size


def rank_sub_batches(n_samples, start, batch_size):
    """The stream indices (0-based from `start`) of this rank's images, one list per sub-batch: of each
    sub-batch of `batch_size` consecutive samples, the rows rank, rank + world, ... (misc/dist.py)."""
    for first in range(0, n_samples - start, batch_size):
        yield dist.rows(list(range(first, min(first + batch_size, n_samples - start))))


def param_groups(model, lr, weight_decay):
    """deeplab-pytorch's get_params: backbone conv weights (lr), ASPP weights (10 lr), ASPP biases (20 lr,
    no weight decay). BatchNorm parameters are in no group (frozen)."""
    backbone, aspp_w, aspp_b = [], [], []
    for name, module in model.base.named_modules():
        if not isinstance(module, torch.nn.Conv2d):
            continue
        if name.startswith("aspp"):
            aspp_w.append(module.weight)
            aspp_b.append(module.bias)
        else:
            backbone += list(module.parameters())
    return [{"params": params, "lr": mult * lr, "weight_decay": weight_decay if decays else 0.0}
            for params, mult, decays in zip((backbone, aspp_w, aspp_b), GROUP_LR_MULT, GROUP_DECAYS)]


def poly_lr(base_lr, update, iter_max, power, step_size):
    """The lr in effect after `update` updates (1-based count) under deeplab-pytorch's PolynomialLR,
    stepped once after every update: base * (1 - t/iter_max) ** power set at the last t <= update with
    t % step_size == 0 and t <= iter_max; base before the first such t."""
    t = min(update, iter_max) // step_size * step_size
    return base_lr if t == 0 else base_lr * (1 - t / iter_max) ** power


def set_lrs(optimizer, base_lrs, update, iter_max, power, step_size):
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["lr"] = poly_lr(base, update, iter_max, power, step_size)


def checkpoint_path(weights_name):
    return weights_name + ".ckpt"


def _check_labels(label_dir, ids):
    require_dir(label_dir, "the training labels <id>.png (pseudo masks of make_sem_seg, or "
                           "SegmentationClassAug for the upper bound); set --seg_label_dir")
    missing = [i for i in ids if not os.path.isfile(os.path.join(label_dir, i + ".png"))]
    if missing:
        raise InputError(f"{len(missing)} of {len(ids)} label PNG(s) of --seg_train_list missing from {label_dir}, "
                         f"e.g. {missing[0]}.png: run make_sem_seg with --infer_list covering --seg_train_list")


def provenance_inputs(args, ids):
    """What decides the trained network (misc/provenance.py): init weights, labels, list, recipe, seed."""
    init = None if str(args.seg_init_weights).lower() == "none" else args.seg_init_weights
    return {"init": provenance.file_digest(init), "label_dir": os.path.normpath(args.seg_label_dir),
            "labels": provenance.folder_identity(args.seg_label_dir), "train_list": provenance.list_digest(ids),
            **provenance.flag_values(args, ["seg_width", "seg_batch_size", "seg_iter_size", "seg_iter_max", "seg_lr",
                                            "seg_momentum", "seg_weight_decay", "seg_poly_power", "seg_lr_step",
                                            "seg_crop_size", "seg_scales", "seed"]),
            **provenance.non_default_flags(args, {"train_amp": "none"})}


def build_model(args, log=print):
    init = None if str(args.seg_init_weights).lower() == "none" else args.seg_init_weights
    return deeplab_v2(N_CLASSES, init, width=args.seg_width, log=log)


def run(args):
    if args.seg_iter_max < 1 or args.seg_batch_size < 1 or args.seg_iter_size < 1:
        raise InputError("--seg_iter_max, --seg_batch_size and --seg_iter_size must be positive")
    device = torch.device(args.device)
    ids = load_img_name_list(args.voc12_root, args.seg_train_list)
    inputs = provenance_inputs(args, ids)
    kept = provenance.file_up_to_date(args.seg_weights_name, "train_seg", inputs, args, "--seg_weights_name")
    if kept:
        print(f"train_seg: {args.seg_weights_name} exists; keeping it ({kept})")
        return
    require_images(args.voc12_root, ids)
    _check_labels(args.seg_label_dir, ids)
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
            if not torch.isfinite(whole):  # stop before the update: the last checkpoint stays good
                raise InputError(f"train_seg: non-finite loss ({whole.item()}) at update {update}; lower --seg_lr "
                                 f"or check the labels in {args.seg_label_dir}")
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
    if dist.is_main():
        provenance.save_weights(args.seg_weights_name, msc_state_dict(model), "train_seg", inputs)
        if os.path.exists(ckpt_path):
            os.remove(ckpt_path)
    print(f"train_seg: saved {args.seg_weights_name} ({seen / (time.perf_counter() - started):.2f} images/s)")
