"""Throughput of the per-image steps on 1, 2, ... processes under torchrun (misc/dist.py).

    python bench/scaling.py [--nproc 1 2] [--steps make_cam make_advcam] [--n 16 --size 160 --width 16]
    python bench/scaling.py --nproc 1 2 4 8 --device cuda --n 200 --size 375 500 --width 64    # a GPU node

For each process count N, `torchrun --standalone --nproc_per_node N run_sample.py --<step>_pass true` (N = 1:
plain `python run_sample.py`) makes the step's outputs for --n fake VOC images (tests/fakevoc.py, --size px)
into a fresh folder, with the same random-weight classifier (frozen BatchNorm with random statistics). The
time is the step's own, as the driver prints it ("== step <name> done in <s> s": model loading, image
reading, the work and the writes; not the start of the processes), the median of --repeats runs. On CPU
every process runs one torch thread (--cpu_threads 1), so N processes use N cores; on CUDA each process
takes one GPU. The outputs of every N are compared with N = 1's byte for byte.

Prints one line per (step, N): images/s and the ratio to N = 1, and last `device=<...>`.
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from fakevoc import make_fake_voc, random_bn_statistics  # noqa: E402
from misc.utils import save_torch  # noqa: E402
from net.resnet50_cam import Net  # noqa: E402

OUT_FLAG = {"make_cam": "--cam_out_dir", "make_advcam": "--advcam_out_dir"}


def random_classifier(path, width, seed=0):
    torch.manual_seed(seed)
    model = random_bn_statistics(Net(pretrained="none", width=width))
    save_torch(path, model.state_dict())


def run_step(step, nproc, voc_root, weights, out_dir, a):
    """Seconds the driver reports for `step` on `nproc` processes."""
    shutil.rmtree(out_dir, ignore_errors=True)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                if nproc > 1 else [sys.executable])
    cmd = launcher + ["run_sample.py", "--preset", "toy", "--device", a.device, "--voc12_root", voc_root,
                      "--work_dir", os.path.dirname(out_dir), "--infer_list", "train", "--backbone_width", str(a.width),
                      "--cam_weights_name", weights, "--wood_weights_name", weights, "--num_workers", "0",
                      "--cpu_threads", "1", "--adv_iter", str(a.adv_iter), OUT_FLAG[step], out_dir,
                      f"--{step}_pass", "true"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return float(re.search(rf"== step {step} done in ([\d.]+) s", done.stdout).group(1))


def folder_bytes(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder)) if n.endswith(".npz")}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", nargs="+", default=["make_cam", "make_advcam"], choices=sorted(OUT_FLAG))
    p.add_argument("--n", type=int, default=16, help="images")
    p.add_argument("--size", type=int, nargs="+", default=[160], help="image side(s): H [W]")
    p.add_argument("--width", type=int, default=16, help="ResNet-50 width (64 = the real one)")
    p.add_argument("--adv_iter", type=int, default=27)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="scaling_")
    try:
        sizes = [tuple(a.size) if len(a.size) == 2 else (a.size[0], a.size[0])]
        voc = make_fake_voc(os.path.join(tmp, "VOC2012"), n_train=a.n, n_val=1, seed=0, sizes=sizes)
        weights = os.path.join(tmp, "cls.pth")
        random_classifier(weights, a.width)
        for step in a.steps:
            reference, base_rate = None, None
            for nproc in a.nproc:
                out_dir = os.path.join(tmp, f"work_{step}_{nproc}", "out")
                seconds = statistics.median(run_step(step, nproc, voc["root"], weights, out_dir, a)
                                            for _ in range(a.repeats))
                outputs = folder_bytes(out_dir)
                if reference is None:
                    reference = outputs
                same = outputs == reference and len(outputs) == a.n
                rate = a.n / seconds
                base_rate = base_rate or rate
                print(f"{step} nproc={nproc} images_per_s={rate:.3f} ratio={rate / base_rate:.2f} "
                      f"same_files_as_first={same}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    gpu = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "cpu"
    print(f"device={a.device} ({gpu}), {a.n} images of {a.size} px, width {a.width}, adv_iter {a.adv_iter}")


if __name__ == "__main__":
    main()
