"""Does train_irn repeat its weights? Two runs with --deterministic true and two without, at the paper's sizes.

    python bench/irn_determinism.py --device cuda                     # crop 512, batch 32, radius 10, width 64
    python bench/irn_determinism.py --device cpu --crop 128 --batch 4 --radius 5 --width 8 --n_images 8

Inputs: --n_images fake VOC-sized images (tests/fakevoc.py, 500 x 375) with IR labels, and a random-init ID
classifier of --width as the backbone (`--pretrained none`: train_irn then starts from the classifier's
backbone). Each run is its own `python run_sample.py --train_irn_pass true` process (--irn_num_epoches 1:
n_images / batch updates, --num_workers loader workers), so --deterministic's global settings
(docs/running.md) never leak from one run to the next. Per mode it prints whether the two runs' weights are
equal tensor for tensor and their largest |difference|, and each run's seconds. On a CPU both modes repeat
(the default float kernels are deterministic there); on CUDA, without --deterministic, cuDNN's weight
gradients and index_select's backward add in a varying order.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from fakevoc import make_voc_sized_ir_labels  # noqa: E402
from net.classifier import build_classifier  # noqa: E402


def train_irn(work, name, a, voc, labels, classifier, deterministic):
    """One train_irn run into <work>/<name>.pth; returns (state dict, seconds)."""
    weights = os.path.join(work, name + ".pth")
    argv = [sys.executable, "run_sample.py", "--device", a.device, "--work_dir", os.path.join(work, name),
            "--voc12_root", voc, "--train_list", "train", "--infer_list", "train", "--ir_label_out_dir", labels,
            "--pretrained", "none", "--cam_weights_name", classifier, "--backbone_width", str(a.width),
            "--irn_crop_size", str(a.crop), "--irn_batch_size", str(a.batch), "--irn_radius", str(a.radius),
            "--irn_num_epoches", "1", "--irn_weights_name", weights, "--num_workers", str(a.num_workers),
            "--deterministic", str(deterministic).lower(), "--train_irn_pass", "true"]
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"train_irn ({name}) failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return torch.load(weights, weights_only=True), seconds


def largest_difference(a, b):
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--n_images", type=int, default=64, help="fake 500 x 375 train images (one epoch)")
    p.add_argument("--crop", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--radius", type=int, default=10)
    p.add_argument("--width", type=int, default=64, help="backbone width (64 = the real ResNet-50)")
    p.add_argument("--num_workers", type=int, default=4)
    a = p.parse_args(argv)
    if a.n_images < a.batch:
        p.error(f"--n_images {a.n_images} is below one batch (--batch {a.batch})")
    with tempfile.TemporaryDirectory(prefix="irn_determinism_") as work:
        voc, labels = make_voc_sized_ir_labels(work, a.n_images)
        classifier = os.path.join(work, "classifier.pth")
        torch.manual_seed(0)
        torch.save(build_classifier("resnet50", a.width, "none", "train_id").state_dict(), classifier)
        print(f"train_irn: {a.n_images} images 500x375, crop {a.crop}, batch {a.batch}, radius {a.radius}, width "
              f"{a.width}, {a.n_images // a.batch} updates, {a.num_workers} loader workers, device {a.device}"
              + (f" ({torch.cuda.get_device_name(0)})" if a.device.startswith("cuda") else ""), flush=True)
        for deterministic in (True, False):
            runs = [train_irn(work, f"{'det' if deterministic else 'free'}{i}", a, voc, labels, classifier,
                              deterministic) for i in (1, 2)]
            (first, s1), (second, s2) = runs
            equal = all(torch.equal(first[k], second[k]) for k in first)
            print(f"--deterministic {str(deterministic).lower()}: weights equal {equal}, largest |difference| "
                  f"{largest_difference(first, second):.3g}, seconds {s1:.1f} / {s2:.1f}", flush=True)


if __name__ == "__main__":
    main()
