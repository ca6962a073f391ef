"""eval_seg's time with its dense CRF in 0, 2, ... CPU processes (--num_workers; docs/method.md §8).

    python bench/eval_seg_crf.py [--workers 0 2] [--n 8 --size 375 500 --width 8 --device cpu --cpu_threads 1]

Makes --n fake VOC val images (tests/fakevoc.py, --size H W px) and a random-weight DeepLab-v2 of --width
(frozen BatchNorm with random statistics), then for each --workers value runs `python run_sample.py
--eval_seg_pass true --num_workers N` into a fresh folder. The time is the step's own, as the driver prints it
("== step eval_seg done in <s> s": model loading, the val split, the samples.png column (the first 2 train
images here) and the scoring; not the interpreter's start). The PNGs of every N are compared with the first's
byte for byte. Prints one line per N (with the CPU seconds of the whole run, its processes together, and the
load average before it: on a shared machine, time the others' processes take is not ours), and last
`device=<...>`.

On a CPU, --cpu_threads 0 (torch's default: all cores) lets the network's threads compete with the CRF
processes for the same cores (OpenMP threads spinning against other processes can be many times slower).
"""
import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from fakevoc import make_fake_voc, random_bn_statistics  # noqa: E402
from misc.utils import save_torch  # noqa: E402
from net.deeplab_v2 import deeplab_v2  # noqa: E402


def png_bytes(work):
    out = {}
    for folder, _, files in os.walk(work):
        for name in files:
            if name.endswith(".png"):
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    out[os.path.relpath(path, work)] = f.read()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--size", type=int, nargs=2, default=[375, 500], metavar=("H", "W"))
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cpu_threads", type=int, default=1, help="the driver's --cpu_threads (0: torch's default)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        voc = make_fake_voc(os.path.join(tmp, "VOC2012"), n_train=2, n_val=a.n, sizes=[tuple(a.size)], n_aug_only=0)
        torch.manual_seed(0)
        weights = os.path.join(tmp, "seg.pth")
        save_torch(weights, random_bn_statistics(deeplab_v2(21, None, width=a.width)).state_dict())
        first = None
        for run, n in enumerate(a.workers):
            work = os.path.join(tmp, f"run{run}_workers{n}")
            cmd = [sys.executable, os.path.join(ROOT, "run_sample.py"), "--voc12_root", voc["root"],
                   "--work_dir", work, "--seg_weights_name", weights, "--seg_width", str(a.width),
                   "--device", a.device, "--num_workers", str(n), "--cpu_threads", str(a.cpu_threads),
                   "--eval_seg_pass", "true"]
            load = os.getloadavg()[0]
            used = resource.getrusage(resource.RUSAGE_CHILDREN)
            text = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
            now = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = now.ru_utime + now.ru_stime - used.ru_utime - used.ru_stime
            seconds = float(re.search(r"== step eval_seg done in ([\d.]+) s", text).group(1))
            pngs = png_bytes(work)
            first = first or pngs
            same = "identical to" if pngs == first else "DIFFER from"
            print(f"eval_seg --num_workers {n}: {seconds:.1f} s ({a.n} val + 2 sample images, {a.size[0]}x{a.size[1]} "
                  f"px, width {a.width}, --cpu_threads {a.cpu_threads}); PNGs {same} --num_workers {a.workers[0]}'s "
                  f"({len(pngs)} files); {cpu:.1f} CPU s (driver included), load {load:.1f} before", flush=True)
    print(f"device={a.device} torch_threads={torch.get_num_threads()} cpus={os.cpu_count()}")


if __name__ == "__main__":
    main()
