"""Time AdvCAM's batched class-runs (step/make_advcam.advcam_regions) against one run per class.

    python bench/advcam_batching.py --width 16 --size 160 --n_classes 3 --iters 8 --device cpu

Same numbers either way (tests/test_advcam.py); this only measures the speed. Random weights and image.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import run_sample  # noqa: E402
from misc.advcam import advcam_regions  # noqa: E402
from net.resnet50_cam import Net  # noqa: E402


def timed(fn, device, repeat):
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--n_classes", type=int, default=3)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    run_sample.set_precision(False)  # as the driver does (no TF32 on CUDA)
    device = torch.device(a.device)
    torch.manual_seed(0)
    model = Net(width=a.width).to(device).eval()
    for q in model.parameters():
        q.requires_grad_(False)
    img = torch.randn(3, a.size, a.size, device=device)
    pair = torch.stack([img, img.flip(-1)])
    classes = list(range(a.n_classes))
    run = lambda cls: advcam_regions(model, pair, cls, a.iters, 7.0, 0.08, 0.5)
    batched = timed(lambda: run(classes), device, a.repeat)
    looped = timed(lambda: [run([c]) for c in classes], device, a.repeat)
    print(f"width {a.width}, {a.size} px, {a.n_classes} classes, {a.iters} iterations, {a.threads} thread(s), "
          f"{device}: batched {batched:.3f} s, one run per class {looped:.3f} s, speed-up {looped / batched:.2f}x")


if __name__ == "__main__":
    main()
