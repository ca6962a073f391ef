"""Training speed of DeepLab-v2 (docs/method.md §8): images/s of train_seg's update (MSC forward, summed loss, backward,
SGD step) on random crops, no data loading.

    python bench/train_seg.py                                   # crop 321, width 64 (ResNet-101), this device
    python bench/train_seg.py --width 16 --blocks 3 4 6 3 --crop 97 --threads 1    # the toy preset's network

Prints seconds per sub-batch and images/s over --iters timed sub-batches after one warm-up.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from net.deeplab_v2 import RESNET101_BLOCKS, deeplab_v2, msc_loss, param_groups  # noqa: E402  # noqa: E402

RECIPE_IMAGES_PER_UPDATE = 10  # batch 5 x ITER_SIZE 2 (docs/method.md §8)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--blocks", type=int, nargs=4, default=list(RESNET101_BLOCKS))
    p.add_argument("--crop", type=int, default=321)
    p.add_argument("--batch", type=int, default=5, help="sub-batch size (the recipe's 5)")
    p.add_argument("--iters", type=int, default=2, help="timed sub-batches")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    model = deeplab_v2(21, None, width=a.width, n_blocks=tuple(a.blocks)).to(device).train()
    optimizer = torch.optim.SGD(param_groups(model, 2.5e-4, 5e-4), lr=2.5e-4, momentum=0.9)
    x = torch.randn(a.batch, 3, a.crop, a.crop, device=device) * 50
    y = torch.randint(0, 21, (a.batch, a.crop, a.crop))

    def sub_batch():
        optimizer.zero_grad()
        msc_loss(model(x), y, 2).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    sub_batch()  # warm-up
    start = time.perf_counter()
    for _ in range(a.iters):
        sub_batch()
    sec = (time.perf_counter() - start) / a.iters
    per_update = RECIPE_IMAGES_PER_UPDATE * sec / a.batch  # at this sub-batch's images/s
    print(f"train_seg bench: device {device}, width {a.width}, blocks {tuple(a.blocks)}, crop {a.crop}, batch "
          f"{a.batch}, threads {torch.get_num_threads()}: {sec:.3f} s per sub-batch, {a.batch / sec:.3f} images/s "
          f"(an update of {RECIPE_IMAGES_PER_UPDATE} images: {per_update:.2f} s; 20000 updates: "
          f"{20000 * per_update / 3600:.1f} h)")


if __name__ == "__main__":
    main()
