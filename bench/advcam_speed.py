"""Throughput of make_advcam's batched AdvCAM against the literal loop of docs/method.md §4.6 (the authors' loop).

    python bench/advcam_speed.py                                   # small and fast, for a 2-core CPU
    python bench/advcam_speed.py --voc_sized --device cuda --amp none bf16 --batch 1 4 8
    python bench/advcam_speed.py --voc_sized --scales 1.0 --n 2 --batch 1 2 --no_warmup   # on a CPU: ~20 min
    python bench/advcam_speed.py --voc_sized --labels 4 --no_literal --device cuda --amp none bf16 --batch 1 4
    (--voc_sized: 375x500 images, full-width ResNet-50 (width 64), adv_iter 27, scales 1.0 0.5 1.5 2.0)

The literal loop (`literal_image_advcam`, also the reference of tests/test_advcam.py) follows docs/method.md §4.6
to the letter: per image, per scale in the order 0.5, 1.0, 1.5, 2.0, per label class, a batch of the
flip pair only, 27 (13 at 0.5) forward + backward passes, the clamp bounds read back to the host each
iteration as the original does (`x.min().item()`), then docs/method.md §4.4's resize / sum / crop / normalise.
make_advcam's path is `misc.advcam.group_advcam` with --batch images of one size per batch (all
their label classes in one batch), optionally --amp bf16 and --channels_last.

Both sides get the same random-init net (frozen BN with random running statistics) and the same MSF
pairs of N fake VOC images (tests/fakevoc.py: 1-2 label classes each, read and rescaled once, before
timing): the timed part is the AdvCAM work of the step, images to maps in memory. Runs are interleaved
(literal, ours per variant, literal, ...) because the machine may be shared; median images/s of
--repeats runs. Each variant prints its images/s, its speed-up over the literal loop on the same
device, the largest |difference| of its `cam` / `high_res` maps from the literal loop's, and the best
mIoU (eval_cam's threshold sweep against the fake ground truth) of both, whose difference is what
--amp bf16 must keep under 0.1 point (with random weights the mIoU itself means nothing).
--labels N gives every image N label classes (its own, then the next class indices): AdvCAM's work grows
with the label count. --no_literal times make_advcam alone (seconds per image and, on CUDA, the peak memory
torch allocated during each variant's runs: `torch.cuda.max_memory_allocated`).
Last line: `images_per_s=<best variant> literal_images_per_s=<lit> speedup=<x> max_abs_diff=<v>
device=<d>`, max_abs_diff over the float32 variants.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import run_sample  # noqa: E402
from fakevoc import advcam_rule, driver_args, make_fake_voc  # noqa: E402
from misc.advcam import group_advcam  # noqa: E402
from misc.metrics import sweep_thresholds  # noqa: E402
from net.resnet50_cam import Net  # noqa: E402
from voc12.dataloader import VOC12ClassificationDatasetMSF  # noqa: E402

# ------------------------------------------------------------------------------------ the literal loop

def literal_class_run(model, pair, c, n_iter, ad_coeff, step_size, score_th):
    """docs/method.md §4.6 to the letter for one class and one MSF pair (2, 3, h, w): (accumulated region, init)."""
    x = pair.clone()
    acc, init = None, None
    n_classes = model.classifier.weight.shape[0]
    for i in range(n_iter):
        x = x.detach().requires_grad_(True)
        feat = model.stage4_features(x)
        A = F.conv2d(feat, model.classifier.weight)
        v = F.relu(A).sum(dim=(2, 3))
        G, = torch.autograd.grad(v[0, c] + v[1, c], feat, retain_graph=True)
        w = (G.sum(dim=(2, 3)) / ((G > 0).sum() + 1e-12)).detach()
        R = F.relu((feat * w[:, :, None, None]).sum(dim=1, keepdim=True))
        region = R[0, 0] + R[1, 0].flip(-1)
        if i == 0:
            init = region.detach()
        acc = region.detach() if acc is None else acc + region.detach()
        g = F.relu(A).mean(dim=(2, 3))
        others = 0
        for b in range(2):
            for k in range(n_classes):
                if k != c:
                    others = others + g[b, k]
        loss_cls = g[0, c] + g[1, c] - others
        mask = region / region.max() > score_th
        loss_ad = ((region - init).abs() * mask).sum()
        loss = loss_cls - ad_coeff * loss_ad
        gx, = torch.autograd.grad(loss, x)
        x = torch.clamp(x + step_size * gx / (gx.abs().max() + 1e-12), x.min().item(), x.max().item()).detach()
    return acc, init


def literal_image_advcam(model, msf_imgs, size, keys, adv_iter, ad_coeff, step_size, score_th):
    """One image: per scale in the original's order [1, 0, 2, 3] of the list, per class, then docs/method.md §4.4.

    Returns (cam (n, (H-1)//4+1, (W-1)//4+1), high_res (n, H, W)), normalised per class."""
    height, width = int(size[0]), int(size[1])
    strided = ((height - 1) // 4 + 1, (width - 1) // 4 + 1)
    up = (((height - 1) // 16 + 1) * 16, ((width - 1) // 16 + 1) * 16)
    cam, high_res = 0, 0
    for position in [1, 0, 2, 3][:len(msf_imgs)] if len(msf_imgs) > 1 else [0]:
        if position == 1:
            n_iter = adv_iter // 2 if adv_iter > 10 else (adv_iter if adv_iter < 6 else 5)
        else:
            n_iter = adv_iter
        pair = torch.as_tensor(msf_imgs[position])
        maps = torch.stack([literal_class_run(model, pair, int(c), n_iter, ad_coeff, step_size, score_th)[0]
                            for c in keys])
        maps = maps * (2 if adv_iter > 10 else 1)
        cam = cam + F.interpolate(maps[None], strided, mode="bilinear", align_corners=False)[0]
        high_res = high_res + F.interpolate(maps[None], up, mode="bilinear", align_corners=False)[0]
    high_res = high_res[:, :height, :width]
    cam = cam / (cam.amax(dim=(1, 2), keepdim=True) + 1e-5)
    high_res = high_res / (high_res.amax(dim=(1, 2), keepdim=True) + 1e-5)
    return cam, high_res


# ---------------------------------------------------------------------------------------------- bench

def attacked_net(width, seed, device, channels_last=False):
    """A random-init CAM net, frozen BN with random running statistics, as make_advcam loads one."""
    torch.manual_seed(seed)
    model = Net(width=width, frozen_bn=True, detach_stage2=False)
    for name, value in model.state_dict().items():  # the state dict's tensors are the buffers themselves
        if name.endswith("running_var"):
            value.uniform_(0.5, 1.5)
        elif name.endswith("running_mean"):
            value.normal_(0, 0.1)
    model = model.to(device).eval()
    for q in model.parameters():
        q.requires_grad_(False)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_literal(model, packs, rule, device):
    out = []
    for pack in packs:
        keys = torch.nonzero(pack["label"])[:, 0]
        msf = [torch.as_tensor(p).to(device) for p in pack["img"]]
        cam, high_res = literal_image_advcam(model, msf, pack["size"], keys, *rule)
        out.append({"keys": keys.numpy(), "cam": cam.cpu().numpy(), "high_res": high_res.cpu().numpy()})
    return out


def run_ours(model, packs, args, batch):
    out = []
    for start in range(0, len(packs), batch):  # the fake images share one size: groups of `batch`
        group = packs[start:start + batch]
        out += group_advcam(model, [(p["img"], p["size"], p["label"]) for p in group], *advcam_rule(args),
                            amp=args.amp, channels_last=args.channels_last)
    return out


def largest_difference(a, b):
    worst = 0.0
    for x, y in zip(a, b):
        if list(x["keys"]) != list(y["keys"]):
            return float("inf")
        for name in ("cam", "high_res"):
            worst = max(worst, float(np.abs(x[name].astype(np.float64) - y[name]).max(initial=0.0)))
    return worst


def best_miou(outputs, packs, gts, thresholds):
    sweep = sweep_thresholds(((o["high_res"], o["keys"], gts[p["name"]]) for o, p in zip(outputs, packs)),
                             thresholds)
    return 100 * max(s["miou"] for s in sweep.values())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4, help="number of images")
    p.add_argument("--size", type=int, nargs=2, default=[64, 64], help="image height and width")
    p.add_argument("--width", type=int, default=8, help="backbone width (64 = the real ResNet-50)")
    p.add_argument("--adv_iter", type=int, default=6)
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.5, 1.5, 2.0])
    p.add_argument("--labels", type=int, default=None, help="label classes per image (default: the image's own)")
    p.add_argument("--no_literal", action="store_true", help="time make_advcam's path only")
    p.add_argument("--voc_sized", action="store_true",
                   help="375x500 images, width 64, adv_iter 27 (overrides --size/--width/--adv_iter)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="make_advcam's --advcam_batch values")
    p.add_argument("--amp", nargs="+", default=["none"], choices=["none", "bf16"])
    p.add_argument("--channels_last", action="store_true")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_warmup", action="store_true",
                   help="skip the untimed first-image pass of each side (on a CPU it only saves time)")
    a = p.parse_args()
    if a.voc_sized:
        a.size, a.width, a.adv_iter = [375, 500], 64, 27
    torch.set_num_threads(a.threads)
    run_sample.set_precision(False)  # as the driver does (no TF32 on CUDA)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible to torch")
    with tempfile.TemporaryDirectory(prefix="bench_advcam_") as work:
        info = make_fake_voc(os.path.join(work, "VOC2012"), n_train=a.n, n_val=1, n_aug_only=0,
                             sizes=[tuple(a.size)], n_classes=20, seed=a.seed)
        dataset = VOC12ClassificationDatasetMSF(info["train"], info["root"], scales=a.scales)
        packs = [dataset[i] for i in range(len(dataset))]
    if a.labels:
        for pack in packs:  # the image's own classes first, then the lowest others
            label = torch.as_tensor(pack["label"])
            order = torch.argsort(-label, stable=True)  # own classes (1) before the rest (0), ascending within
            pack["label"] = torch.zeros_like(label).index_fill_(0, order[:a.labels], 1)
    n_runs = sum(int(pk["label"].sum()) for pk in packs)
    step_args = {amp: driver_args(adv_iter=a.adv_iter, amp=amp, channels_last=a.channels_last) for amp in a.amp}
    paper = driver_args()  # the regulariser's constants, from the driver's parser (its one source of configuration)
    rule = (a.adv_iter, paper.AD_coeff, paper.AD_stepsize, paper.score_th)
    model = attacked_net(a.width, a.seed, device)
    fast_model = attacked_net(a.width, a.seed, device, a.channels_last) if a.channels_last else model
    variants = [(f"make_advcam batch {b} amp {amp}" + (" channels_last" if a.channels_last else ""), b, amp)
                for amp in a.amp for b in a.batch]
    thresholds = [round(0.05 * i, 2) for i in range(1, 13)]

    sides = ([] if a.no_literal else [("literal loop", None, None)]) + variants
    if not a.no_warmup:  # allocator, cuDNN autotuning: on the first image, not timed
        if not a.no_literal:
            run_literal(model, packs[:1], rule, device)
        for _, b, amp in variants:
            run_ours(fast_model, packs[:1], step_args[amp], b)
    rates = {name: [] for name, _, _ in sides}
    outputs, peak_mib = {}, {}
    for r in range(a.repeats):
        for name, b, amp in sides:
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            with torch.autocast(device.type, enabled=False):
                out = (run_literal(model, packs, rule, device) if b is None
                       else run_ours(fast_model, packs, step_args[amp], b))
            sync(device)
            seconds = time.perf_counter() - start
            rates[name].append(len(packs) / seconds)
            outputs[name] = out
            if device.type == "cuda":
                peak_mib[name] = max(peak_mib.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 2 ** 20)
            print(f"[run {r + 1}/{a.repeats}] {name}: {seconds:.2f} s, {len(packs) / seconds:.3f} images/s", flush=True)

    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"\n{len(packs)} images {a.size[0]}x{a.size[1]}, {n_runs} class-runs, width {a.width}, "
          f"adv_iter {a.adv_iter}, scales {a.scales}, {a.threads} thread(s), device {device}{gpu}; "
          f"median of {a.repeats} run(s):")
    if a.no_literal:
        for name, _, _ in variants:
            rate = statistics.median(rates[name])
            peak = f", peak memory {peak_mib[name]:.0f} MiB" if name in peak_mib else ""
            print(f"{name}: {1 / rate:.2f} s/image ({rate:.3f} images/s){peak}")
        return
    literal = statistics.median(rates["literal loop"])
    literal_miou = best_miou(outputs["literal loop"], packs, info["gt"], thresholds)
    print(f"literal loop: {literal:.3f} images/s, best mIoU {literal_miou:.2f}")
    fp32_diffs, best = [], ("literal loop", literal)
    for name, b, amp in variants:
        rate = statistics.median(rates[name])
        diff = largest_difference(outputs[name], outputs["literal loop"])
        miou = best_miou(outputs[name], packs, info["gt"], thresholds)
        if amp == "none":
            fp32_diffs.append(diff)
        if rate > best[1]:
            best = (name, rate)
        print(f"{name}: {rate:.3f} images/s, speedup {rate / literal:.2f}x, max_abs_diff {diff:.3g}, "
              f"best mIoU {miou:.2f} ({miou - literal_miou:+.2f})")
    print(f"images_per_s={best[1]:.3f} literal_images_per_s={literal:.3f} speedup={best[1] / literal:.3f} "
          f"max_abs_diff={max(fp32_diffs, default=float('nan')):.3g} device={device}{gpu} "
          f"best={best[0].replace(' ', '_')}")


if __name__ == "__main__":
    main()
