"""ToyNet: the toy world's "ImageNet" pre-training of the ResNet-50 backbone (ToyVOC has no ImageNet).

    python -m toy.toynet --out sess/toy/resnet50_toynet_w16.pth --seed 0

Why it exists: the paper starts every network from ImageNet weights, whose features recognise objects
and "stuff" (rails, water, sky) separately, because ImageNet shows them in every combination. A
classifier trained from scratch on ToyVOC alone learns features that tie a cue to its object (it tells
"rails next to a train" from "rails alone"), and W-OoD, which teaches that a cue alone is no class, then
barely changes its CAMs (docs/toy.md, "The W-OoD effect on ToyVOC"). ToyNet pre-trains the backbone on
generated scenes drawn by toy.toyvoc's painters in which the object class (or no object) and the
stuff of the top and bottom regions are drawn independently and uniformly: multi-label classification
of the 9 toy object classes plus the 7 stuff kinds (6 cues, generic), ordinary BatchNorm, SGD with real
momentum (an ordinary pre-training, not part of the method's recipe). The images are made in memory;
nothing but the weights and their record is written.

Output: a torchvision-format state dict (`conv1.weight`, `bn1.*`, `layer1.*` .. `layer4.*`, `fc.*`) of
a width-`--width` ResNet-50, loaded by `--pretrained <file> --backbone_width <width>` exactly like
torchvision's ImageNet file, and its record `<out>.provenance.json` (the flags and a digest of the first
scenes; misc/provenance.py): a file made by other flags or other scenes is refused, not reused. The file
of the default flags ships with the project (sess/toy/resnet50_toynet_w16.pth, 12.5 minutes of 1-thread
pre-training on a 2-core CPU), as ImageNet weights are downloaded, not trained, by a real run;
tests/test_toynet.py checks that its record matches this file's defaults and painters (not `train()`'s
code: after a change there, make the file again with --overwrite and commit it). Then every step
follows the paper's recipe: frozen BatchNorm with these statistics, conv1/bn1 frozen, stage2 detached when
training the ID classifier.
"""
import argparse
import hashlib
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from misc import imutils, provenance
from misc.torchutils import gap2d, make_poly_optimizer
from misc.utils import InputError
from net.resnet50 import ResNet50
from toy.toyvoc import CUE_PAINTERS, TOP_CLASSES, TOY_CLASSES, draw_visible_scene, image_size

STREAM_TOYNET = 4                                     # generator salt, apart from toy.toyvoc's streams
STUFF_KINDS = tuple(CUE_PAINTERS) + ("generic",)       # 6 cues + generic stuff
LABELS = tuple(TOY_CLASSES) + STUFF_KINDS              # 9 object classes, then 7 stuff kinds
NO_OBJECT_PROB = 0.15                                  # share of stuff-only scenes
N_SCENES_RECORDED = 16                                 # scenes whose digest the weights' record keeps


def draw_toynet_image(seed, index, long_min, long_max):
    """One scene: an object of a random class (or none) on independently drawn top / bottom stuff.

    Returns rgb uint8 (h, w, 3) and its multi-hot label over LABELS (float32).
    """
    rng = np.random.default_rng([seed, STREAM_TOYNET, index])
    h, w = image_size(rng, long_min, long_max)
    cls = None if rng.random() < NO_OBJECT_PROB else TOY_CLASSES[rng.integers(len(TOY_CLASSES))]
    stuff = (STUFF_KINDS[rng.integers(len(STUFF_KINDS))], STUFF_KINDS[rng.integers(len(STUFF_KINDS))])
    top = cls if cls in TOP_CLASSES else None
    bottom = cls if cls is not None and cls not in TOP_CLASSES else None
    if rng.random() < 0.5:   # as in ToyVOC: where an object stands is no evidence
        top, bottom = bottom, top
    rgb, *_ = draw_visible_scene(rng, h, w, top, bottom, True, True, True, 0, stuff=stuff)
    label = np.zeros(len(LABELS), np.float32)
    if cls is not None:
        label[LABELS.index(cls)] = 1
    for kind in stuff:
        label[LABELS.index(kind)] = 1
    return rgb, label


class ToyNetDataset(torch.utils.data.Dataset):
    """The generated images (kept in memory) with the classification training recipe of docs/method.md §1.2."""

    def __init__(self, images, labels, resize_long, crop_size):
        self.images, self.labels = images, labels
        self.resize_long, self.crop_size = resize_long, crop_size

    def __len__(self):
        return len(self.images)

    def __getitem__(self, idx):
        img = imutils.random_resize_long(self.images[idx], *self.resize_long)
        img = imutils.random_flip(imutils.normalize(img))
        img = imutils.random_crop(img, None, self.crop_size, (0, 255))
        return torch.from_numpy(imutils.hwc_to_chw(img)), torch.from_numpy(self.labels[idx])


class ToyNetClassifier(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.backbone = ResNet50(strides=(2, 2, 2, 1), width=width, frozen_bn=False)
        self.fc = nn.Linear(self.backbone.out_channels, len(LABELS))

    def forward(self, x):
        return self.fc(gap2d(self.backbone(x)))

    def torchvision_state_dict(self):
        """The backbone's tensors under torchvision's names, plus `fc.*` (dropped by the loader)."""
        state = {k: v.detach().cpu().clone() for k, v in self.backbone.state_dict().items()}
        state.update({f"fc.{k}": v.detach().cpu().clone() for k, v in self.fc.state_dict().items()})
        return state


def generate(args):
    images, labels = [], []
    for index in tqdm(range(args.n_images), desc="toynet images", unit="img"):
        rgb, label = draw_toynet_image(args.seed, index, args.long_min, args.long_max)
        images.append(rgb)
        labels.append(label)
    return images, np.stack(labels)


def scene_digest(args, n=N_SCENES_RECORDED):
    """Content hash of the first `n` training scenes and labels: tells whether the painters changed."""
    sha = hashlib.sha256()
    for index in range(n):
        rgb, label = draw_toynet_image(args.seed, index, args.long_min, args.long_max)
        sha.update(np.ascontiguousarray(rgb).tobytes())
        sha.update(label.tobytes())
    return "sha256:" + sha.hexdigest()[:provenance.DIGEST_CHARS]


def provenance_inputs(args):
    """What decides the weights (misc/provenance.py): the flags (--threads too: it changes the float
    rounding) and the scenes."""
    return {**provenance.flag_values(args, ["seed", "width", "n_images", "long_min", "long_max", "resize_long",
                                            "crop_size", "steps", "batch_size", "lr", "momentum",
                                            "weight_decay", "num_workers", "threads"]),
            "scenes": scene_digest(args)}


def train(args, images, labels):
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    model = ToyNetClassifier(args.width)
    optimizer = make_poly_optimizer([(model.parameters(), 1)], args.lr, args.weight_decay, args.steps,
                                    real_momentum=args.momentum)
    loader = torch.utils.data.DataLoader(ToyNetDataset(images, labels, args.resize_long, args.crop_size),
                                         batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.num_workers, persistent_workers=args.num_workers > 0)
    model.train()
    bar = tqdm(total=args.steps, desc="toynet pre-training", unit="step")
    running, step = None, 0
    while step < args.steps:
        for img, label in loader:
            loss = F.multilabel_soft_margin_loss(model(img), label)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}")
            if step == args.steps:
                break
    bar.close()
    return model, running


@torch.inference_mode()
def accuracy(model, images, labels):
    """Share of correct label decisions (sigmoid > 0.5) over all labels, full images, eval mode."""
    model.eval()
    correct = []
    for rgb, label in zip(images, labels):
        x = torch.from_numpy(imutils.hwc_to_chw(imutils.normalize(rgb)))[None]
        correct.append(((model(x)[0] > 0).float().numpy() == label).mean())
    return float(np.mean(correct))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=os.path.join("sess", "toy", "resnet50_toynet_w16.pth"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=16, help="ResNet-50 width (64 = the real one)")
    p.add_argument("--n_images", type=int, default=3000)
    p.add_argument("--n_check", type=int, default=200, help="held-out images for the printed accuracy")
    p.add_argument("--long_min", type=int, default=128)
    p.add_argument("--long_max", type=int, default=160)
    p.add_argument("--resize_long", type=int, nargs=2, default=[100, 200])
    p.add_argument("--crop_size", type=int, default=128)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight_decay", type=float, default=1e-4)
    p.add_argument("--num_workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--overwrite", action="store_true", help="pre-train again over a file made by other flags")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    kept = provenance.file_up_to_date(args.out, "toynet", lambda: provenance_inputs(args), args, "--out")
    if kept:
        print(f"toynet: {args.out} exists; keeping it ({kept})")
        return
    if args.n_images < args.batch_size:
        raise SystemExit(f"error: --n_images {args.n_images} is less than one batch ({args.batch_size})")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    images, labels = generate(args)
    check = generate(argparse.Namespace(**{**vars(args), "n_images": args.n_check, "seed": args.seed + 10_000}))
    model, loss = train(args, images, labels)
    held_out = accuracy(model, *check)
    print(f"toynet: {args.steps} steps, final loss {loss:.4f}, held-out label accuracy "
          f"{100 * held_out:.1f} % ({args.n_check} images)")
    seconds = round(time.time() - start)
    provenance.save_weights(args.out, model.torchvision_state_dict(), "toynet", provenance_inputs(args),
                            extra={"held_out_label_accuracy": round(held_out, 4), "n_check": args.n_check,
                                   "seconds": seconds})
    print(f"toynet: saved {args.out} (width {args.width}) in {seconds} s")


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        raise SystemExit(f"error: {e}") from None
