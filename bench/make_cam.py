"""Throughput of make_cam (the make_cam step) against a literal per-image, per-scale, per-copy loop.

    python bench/make_cam.py [--n 32 --size 160 --width 16 --num_workers 1 2 --repeats 3 --device cpu]
    python bench/make_cam.py --voc12_root Data/VOC2012 --n 50 --width 64 --device cuda
    python bench/make_cam.py --size 375 500 --n 40 --width 64 --device cuda --num_workers 4 \
        --make_cam_batch 8 --amp bf16

Both sides use the same weights (random init, frozen BatchNorm with random running statistics, saved
to a .pth and loaded the way make_cam loads it) and the same images (N fake VOC images of --size px made
by tests/fakevoc.py, or the first N ids of --infer_list under --voc12_root). Every run reads the images,
computes and writes one .npz per image into a fresh folder, so a run's wall time is the whole step:
model loading (and, with --cpu_jit true, make_cam's tracing of its frozen graph), image decoding and
rescaling, forwards, resizes, writes (and for the CPU process pool the start of its helper processes).
The literal loop follows docs/method.md §4.4 / 2.2 / 1.2 to the letter: for each image, for each scale,
rescale + normalise, forward x and flip(x) separately (batch 1),
A = relu(conv2d(stage4, classifier.weight)), A_x + flip(A_flip), bilinear resize to the strided and
strided-up sizes, sum over scales, crop, keep the label classes, divide each by its max + 1e-5.

The runs are interleaved (ours with each --num_workers, literal, ours, literal, ...) because the
machine is shared, and the median images/s of --repeats runs is reported. `--threads` sets the torch
intra-op threads of this process, which runs the literal loop and make_cam's single-process path
(--num_workers 0 or 1 on CPU, and every GPU run); the CPU process pool always runs one thread per process.
Outputs of the last run of each variant are compared file by file (same keys and shapes; largest
absolute difference of `cam` and `high_res`). CPU s/image counts this process and its finished
child processes (loader workers, the pool), so it shows the work done whatever else the machine runs.
`--breakdown` adds per-image timings of the parts of one image's work, in this process.

One line per variant, then last: `images_per_s=<ours> literal_images_per_s=<lit> speedup=<x>
max_abs_diff=<v> device=<d>`, where <ours> is make_cam with the last --num_workers value and
max_abs_diff the largest difference of any variant from the literal loop.
"""
import argparse
import os
import shutil
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
from fakevoc import make_fake_voc, random_bn_statistics  # noqa: E402
from misc import cam as cam_maths  # noqa: E402
from misc import imutils  # noqa: E402
from misc.utils import load_npz, save_npz, save_torch  # noqa: E402
from net.classifier import load_classifier  # noqa: E402
from net.resnet50_cam import CAM  # noqa: E402
from voc12.dataloader import VOC12ClassificationDatasetMSF, img_path, load_image_labels, load_img_name_list  # noqa: E402

# ------------------------------------------------------------------------------------ the literal loop

def literal_make_cam(args):
    """docs/method.md §4.4 to the letter, one image, one scale, one copy at a time; writes <cam_out_dir>/<id>.npz."""
    device = torch.device(args.device)
    model = load_classifier(args.cam_weights_name, args.backbone, args.backbone_width, args.device, "cam")
    ids = load_img_name_list(args.voc12_root, args.infer_list)
    labels = load_image_labels(args.voc12_root, ids)
    os.makedirs(args.cam_out_dir, exist_ok=True)
    with torch.inference_mode():
        for img_id, label in zip(ids, labels):
            img = imutils.read_rgb(img_path(args.voc12_root, img_id))
            H, W = img.shape[:2]
            strided_size = ((H - 1) // 4 + 1, (W - 1) // 4 + 1)
            strided_up_size = (((H - 1) // 16 + 1) * 16, ((W - 1) // 16 + 1) * 16)
            cam, high_res = 0, 0
            for s in args.cam_scales:
                s_img = img if s == 1 else imutils.rescale(img, s, 3)
                x = torch.from_numpy(np.ascontiguousarray(imutils.hwc_to_chw(imutils.normalize(s_img))))
                x = x.to(device)
                maps = []
                for copy in (x, torch.flip(x, [2])):   # the two images of the MSF pair, separately
                    features = model.stage4(model.stage3(model.stage2(model.stage1(copy[None]))))
                    maps.append(F.relu(F.conv2d(features, model.classifier.weight))[0])
                a = maps[0] + torch.flip(maps[1], [2])
                cam = cam + F.interpolate(a[None], strided_size, mode="bilinear", align_corners=False)[0]
                high_res = high_res + F.interpolate(a[None], strided_up_size, mode="bilinear",
                                                    align_corners=False)[0]
            high_res = high_res[:, :H, :W]
            keys = np.nonzero(label)[0]
            keys_dev = torch.as_tensor(keys, device=device)
            cam, high_res = cam[keys_dev], high_res[keys_dev]
            cam = torch.stack([cam[k] / (cam[k].max() + 1e-5) for k in range(len(keys))])
            high_res = torch.stack([high_res[k] / (high_res[k].max() + 1e-5) for k in range(len(keys))])
            save_npz(os.path.join(args.cam_out_dir, img_id + ".npz"), keys=keys.astype(np.int64),
                     cam=cam.cpu().numpy(), high_res=high_res.cpu().numpy())


# ---------------------------------------------------------------------------------------------- setup

def cpu_seconds():
    """CPU time (user + system) of this process and of its finished children (pool, loader workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def make_weights(path, width, seed):
    """A random-init CAM net with frozen BN and non-trivial running statistics, saved to `path`."""
    torch.manual_seed(seed)
    model = random_bn_statistics(CAM(width=width))
    save_torch(path, model.state_dict())


def step_args(a, work, voc12_root, infer_list, weights, out_dir, num_workers):
    """make_cam's arguments as the driver builds them (toy preset, paths and sizes overridden)."""
    return run_sample.parse_args([
        "--preset", "toy", "--work_dir", work, "--voc12_root", voc12_root, "--infer_list", infer_list,
        "--make_cam_from", "id", "--cam_weights_name", weights, "--backbone_width", str(a.width),
        "--device", a.device, "--num_workers", str(num_workers), "--cam_out_dir", out_dir,
        "--cpu_jit", a.cpu_jit, "--make_cam_batch", str(a.make_cam_batch), "--amp", a.amp,
        "--channels_last", str(a.channels_last)])


def compare(dir_a, dir_b, ids):
    """Largest |a - b| over `cam` and `high_res` of every id (inf if keys or shapes differ)."""
    worst = 0.0
    for i in ids:
        x, y = load_npz(os.path.join(dir_a, i + ".npz")), load_npz(os.path.join(dir_b, i + ".npz"))
        if x["keys"].tolist() != y["keys"].tolist():
            return float("inf")
        for name in ("cam", "high_res"):
            if x[name].shape != y[name].shape or x[name].dtype != y[name].dtype:
                return float("inf")
            worst = max(worst, float(np.abs(x[name].astype(np.float64) - y[name]).max(initial=0.0)))
    return worst


def breakdown(args, ids, n_max=8):
    """Mean per-image seconds of each part of make_cam's work on one image, in this process."""
    device = torch.device(args.device)
    model = load_classifier(args.cam_weights_name, args.backbone, args.backbone_width, args.device, "cam")
    dataset = VOC12ClassificationDatasetMSF(ids[:n_max], args.voc12_root, scales=args.cam_scales)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    parts = {k: [] for k in ["read+rescale+normalise", "forward pairs (ours)", "forward copies one by one",
                             "resize+sum all 20 classes (ours)", "resize+sum label classes only",
                             "keep+normalise+save"]}

    def clock(name, fn):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        parts[name].append(time.perf_counter() - start)
        return out

    tmp = tempfile.mkdtemp(prefix="bd_", dir=os.path.dirname(args.cam_out_dir))
    with torch.inference_mode():
        model(torch.zeros(2, 3, 64, 64, device=device))  # warm-up
        for i in range(len(dataset)):
            pack = clock("read+rescale+normalise", lambda: dataset[i])
            pairs = [torch.as_tensor(p).to(device) for p in pack["img"]]
            outs = clock("forward pairs (ours)", lambda: [model(p) for p in pairs])
            clock("forward copies one by one", lambda: [F.relu(model.class_maps(p[k:k + 1]))
                                                        for p in pairs for k in range(2)])
            size = int(pack["size"][0]), int(pack["size"][1])
            strided, high_res = clock("resize+sum all 20 classes (ours)",
                                      lambda: cam_maths.accumulate_scale_maps(outs, size))
            keys = torch.nonzero(pack["label"])[:, 0].to(device)
            clock("resize+sum label classes only",
                  lambda: cam_maths.accumulate_scale_maps([o[keys] for o in outs], size))

            def finish():
                k, c, h = cam_maths.keep_label_classes(strided, high_res, pack["label"])
                save_npz(os.path.join(tmp, pack["name"] + ".npz"), keys=k.numpy(), cam=c.cpu().numpy(),
                         high_res=h.cpu().numpy())
            clock("keep+normalise+save", finish)
    shutil.rmtree(tmp)
    return {k: sum(v) / len(v) for k, v in parts.items()}


# ----------------------------------------------------------------------------------------------- main

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=32, help="number of images")
    p.add_argument("--size", type=int, nargs="+", default=[160], help="fake image size: S or H W")
    p.add_argument("--width", type=int, default=16, help="backbone width (64 = the real ResNet-50)")
    p.add_argument("--num_workers", type=int, nargs="+", default=[1, 2], help="make_cam variants to time")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads of this process (see above)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cpu_jit", default="true", help="make_cam's --cpu_jit (frozen TorchScript graph on CPU)")
    p.add_argument("--make_cam_batch", type=int, default=1,
                   help="make_cam's --make_cam_batch (images of one size per forward)")
    p.add_argument("--amp", default="none", choices=["none", "bf16"], help="make_cam's --amp")
    p.add_argument("--channels_last", action="store_true", help="make_cam's --channels_last")
    p.add_argument("--voc12_root", default=None, help="real VOC folder instead of fake images")
    p.add_argument("--infer_list", default="train", help="with --voc12_root: split name or list file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--breakdown", action="store_true", help="also time the parts of one image's work")
    p.add_argument("--keep", default=None, help="keep the work folder here (default: a deleted temp folder)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    run_sample.set_precision(False)  # as the driver does: cuDNN's TF32 default shifts CUDA CAMs by ~1e-3
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible to torch")
    work = a.keep or tempfile.mkdtemp(prefix="bench_make_cam_")
    os.makedirs(work, exist_ok=True)
    try:
        if a.voc12_root:
            voc12_root = a.voc12_root
            ids = load_img_name_list(voc12_root, a.infer_list)[:a.n]
        else:
            voc12_root = os.path.join(work, "VOC2012")
            size = a.size if len(a.size) == 2 else a.size * 2
            ids = make_fake_voc(voc12_root, n_train=a.n, n_val=1, n_aug_only=0, sizes=[tuple(size)],
                                seed=a.seed)["train"]
        infer_list = os.path.join(work, "ids.txt")
        warm_list = os.path.join(work, "warm_ids.txt")
        for path, chosen in ((infer_list, ids), (warm_list, ids[:2])):
            with open(path, "w") as f:
                f.write("\n".join(chosen) + "\n")
        weights = os.path.join(work, "cam.pth")
        make_weights(weights, a.width, a.seed)

        variants = [(f"make_cam --num_workers {n}", n) for n in a.num_workers] + [("literal loop", None)]

        def run_variant(num_workers, out_dir, id_list):
            workers = 1 if num_workers is None else num_workers  # (unused by the literal loop)
            args = step_args(a, work, voc12_root, id_list, weights, out_dir, workers)
            start, cpu_start = time.perf_counter(), cpu_seconds()
            if num_workers is None:
                literal_make_cam(args)
            else:
                run_sample.run_step("make_cam", args)
            return time.perf_counter() - start, cpu_seconds() - cpu_start

        for name, n in variants:  # warm-up (imports, caches, allocator), not timed
            run_variant(n, os.path.join(work, "warm", name.replace(" ", "_")), warm_list)
        rates, cpu_per_image = {name: [] for name, _ in variants}, {name: [] for name, _ in variants}
        last_dir = {}
        for r in range(a.repeats):
            for name, n in variants:
                out_dir = os.path.join(work, f"run{r}", name.replace(" ", "_"))
                seconds, cpu = run_variant(n, out_dir, infer_list)
                rates[name].append(len(ids) / seconds)
                cpu_per_image[name].append(cpu / len(ids))
                if name in last_dir:
                    shutil.rmtree(last_dir[name])
                last_dir[name] = out_dir
                print(f"[run {r + 1}/{a.repeats}] {name}: {seconds:.2f} s, {len(ids) / seconds:.2f} images/s, "
                      f"{cpu / len(ids):.3f} CPU s/image", flush=True)

        literal = statistics.median(rates["literal loop"])
        diffs = {}
        scales = step_args(a, work, voc12_root, infer_list, weights, work, 1).cam_scales
        gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
        print(f"\n{len(ids)} images, width {a.width}, scales {scales}, make_cam_batch {a.make_cam_batch}, amp {a.amp}, "
              f"channels_last {a.channels_last}, "
              f"{a.threads} thread(s) in this process, device {device}{gpu}; median of {a.repeats} interleaved runs:")
        for name, n in variants:
            rate = statistics.median(rates[name])
            line = (f"{name}: {rate:.2f} images/s (runs: {', '.join(f'{x:.2f}' for x in rates[name])}), "
                    f"{statistics.median(cpu_per_image[name]):.3f} CPU s/image")
            if n is not None:
                diffs[name] = compare(last_dir[name], last_dir["literal loop"], ids)
                line += f", speedup {rate / literal:.2f}x, max_abs_diff {diffs[name]:.3g}"
            print(line)
        if a.breakdown:
            args = step_args(a, work, voc12_root, infer_list, weights, os.path.join(work, "bd"), 1)
            print("per-image seconds (mean over up to 8 images, this process):")
            for part, seconds in breakdown(args, ids).items():
                print(f"  {part}: {seconds:.4f}")
        ours = statistics.median(rates[variants[-2][0]])
        print(f"images_per_s={ours:.3f} literal_images_per_s={literal:.3f} speedup={ours / literal:.3f} "
              f"max_abs_diff={max(diffs.values()):.3g} device={device}")
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
