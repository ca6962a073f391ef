"""Per-rank cost of train_irn's data loading under torchrun: what each rank decodes and the memory it holds.

    python bench/loader_memory.py [--n_images 64 --batches 2 --workers 2 --sleep 0.5] [--out results.json]

The dataset is exactly the one step/train_irn.py builds at the paper's settings: `irn_training_dataset` with a
PathIndex(radius 10, 128 x 128 label grid), crop 512, rescale (0.5, 1.5), flip, random crop, global batch 32.
Its inputs are --n_images fake VOC-sized images (tests/fakevoc.py, 500 x 375 JPEG) with IR label PNGs
(single-channel, values 0..20 and 255: the fake ground truths, 20 classes) written to a temporary folder.
One item carries 3 affinity label maps of 152 directions x 13,090 source pixels (float32), ~22.8 MiB, plus
the 3 x 512 x 512 float32 crop.

Two designs of the loader, each on 1 and 2 gloo processes (`torchrun --standalone`, OMP_NUM_THREADS=1, one
torch thread per process, --workers DataLoader workers per rank):
- "old": every rank builds `DataLoader(dataset, batch_size=32, shuffle=True, drop_last=True,
  num_workers=W)` after the same `torch.manual_seed`, decodes the whole global batch and keeps its slice
  (`misc.dist.batch_slice` of each tensor);
- "new": `misc.sampling.training_loader(dataset, 32, seed, "train_irn", W, "cpu")`, whose batch sampler
  hands each rank only its slice of every global batch (what train_irn runs now).
Each rank iterates --batches global batches, sleeps --sleep s after each (as a training step would, so
that the workers' prefetch fills) and drops it; no model runs.

Measured per rank:
- images read: items the dataset produced in this rank's processes (main process and loader workers),
  counted by a wrapper around the dataset's `__getitem__`. Items the workers prefetched for batches past
  --batches count too (they were decoded); with --batches equal to an epoch (n_images / 32) there are none;
- file MiB: bytes of the JPEG and label PNG files those items opened;
- MiB decoded: the arrays those items carry (image crop, label, reduced label, the 3 affinity label maps);
- peak RSS / peak shared MiB: the peak over time of the sum of VmRSS (resp. RssShmem) of the rank process
  and its descendants (the loader workers), from /proc/<pid>/status read every --interval s by a thread
  of the rank. Shared pages (the batches the workers hand over in shared memory) are counted in every
  process that maps them, so the sums can exceed the memory actually used; VmRSS includes RssShmem and
  the mapped libraries (~0.3-0.4 GiB per process with torch loaded);
- seconds: from the creation of the loader's iterator to the end of the last batch (the sleeps included).

Prints one table and the machine (os.cpu_count(), /proc/cpuinfo model name, memory, load average); --out
writes the results as JSON. `--worker` is the hidden per-rank mode that the runs launch under torchrun.
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

MiB = float(1 << 20)
CROP, BATCH, RADIUS, SEED = 512, 32, 10, 0
DESIGNS, NPROCS = ("old", "new"), (1, 2)


# ------------------------------------------------------------------------------------------------ data

def nbytes(value):
    if isinstance(value, np.ndarray):
        return value.nbytes
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    return 0


class CountingDataset(torch.utils.data.Dataset):
    """`dataset` whose every item appends "files_bytes decoded_bytes" to <log_dir>/<pid>.log (the process that
    decoded it: the rank or one of its loader workers)."""

    def __init__(self, dataset, log_dir):
        self.dataset, self.log_dir = dataset, log_dir

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, idx):
        from voc12.dataloader import img_path
        out = self.dataset[idx]
        name = self.dataset.img_name_list[idx]
        files = (os.path.getsize(img_path(self.dataset.voc12_root, name))
                 + os.path.getsize(self.dataset.label_path(name)))
        decoded = sum(nbytes(v) for v in out.values())
        with open(os.path.join(self.log_dir, f"{os.getpid()}.log"), "a") as f:
            f.write(f"{files} {decoded}\n")
        return out


def read_counts(log_dir):
    items = files = decoded = 0
    for path in glob.glob(os.path.join(log_dir, "*.log")):
        with open(path) as f:
            for line in f:
                a, b = line.split()
                items, files, decoded = items + 1, files + int(a), decoded + int(b)
    return items, files, decoded


# ---------------------------------------------------------------------------------------------- memory

def _status_kib(pid, keys=("VmRSS", "RssShmem", "RssAnon")):
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:  # the process ended
        return None
    return {k: int(fields[k].split()[0]) if k in fields else 0 for k in keys}


def _descendants(pid):
    """pid and its descendants (scanning /proc: this kernel has no /proc/<pid>/task/<tid>/children)."""
    parent = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                text = f.read()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2:].split()
        parent[int(stat.split("/")[2])] = int(fields[1])
    family, grew = {pid}, True
    while grew:
        grew = False
        for p, pp in parent.items():
            if pp in family and p not in family:
                family.add(p)
                grew = True
    return family


class MemorySampler(threading.Thread):
    """Peak over time of the summed VmRSS / RssShmem / RssAnon (KiB) of this process and its descendants."""

    def __init__(self, interval):
        super().__init__(daemon=True)
        self.interval, self.stop_flag = interval, threading.Event()
        self.peak = {"VmRSS": 0, "RssShmem": 0, "RssAnon": 0}
        self.max_processes = 0

    def sample(self):
        total = {k: 0 for k in self.peak}
        family = _descendants(os.getpid())
        for pid in family:
            status = _status_kib(pid)
            if status:
                for k in total:
                    total[k] += status[k]
        for k in total:
            self.peak[k] = max(self.peak[k], total[k])
        self.max_processes = max(self.max_processes, len(family))

    def run(self):
        while not self.stop_flag.is_set():
            self.sample()
            self.stop_flag.wait(self.interval)

    def stop(self):
        self.stop_flag.set()
        self.join()
        self.sample()


# ------------------------------------------------------------------------------------------- one rank

def worker(a):
    """One rank under torchrun: build train_irn's dataset, iterate --batches global batches, write the JSON."""
    torch.set_num_threads(1)
    from misc import dist, indexing, sampling
    from net.resnet50_irn import FEATURE_STRIDE
    from voc12.affinity import irn_training_dataset

    dist.init("cpu")
    rank, world = dist.rank(), dist.world()
    grid = CROP // FEATURE_STRIDE
    path_index = indexing.PathIndex(radius=RADIUS, default_size=(grid, grid))
    dataset = irn_training_dataset("train", a.labels, CROP, a.voc, path_index)
    log_dir = os.path.join(a.result_dir, f"{a.design}{world}_rank{rank}")
    os.makedirs(log_dir)
    counted = CountingDataset(dataset, log_dir)
    if a.design == "old":
        torch.manual_seed(SEED)
        loader = torch.utils.data.DataLoader(counted, batch_size=BATCH, shuffle=True, drop_last=True,
                                             num_workers=a.workers)
    else:
        loader = sampling.training_loader(counted, BATCH, SEED, "train_irn", a.workers, "cpu")

    sampler = MemorySampler(a.interval)
    sampler.sample()
    before = dict(sampler.peak)
    sampler.start()
    dist.barrier()
    start = time.perf_counter()
    batches, rows = 0, 0
    iterator = iter(loader)
    for pack in iterator:
        if a.design == "old":
            pack = {k: dist.batch_slice(v) if torch.is_tensor(v) else v for k, v in pack.items()}
        rows += pack["img"].shape[0]
        batches += 1
        time.sleep(a.sleep)
        del pack
        if batches == a.batches:
            break
    seconds = time.perf_counter() - start
    sampler.stop()
    del iterator  # shuts the workers down
    dist.barrier()
    items, files, decoded = read_counts(log_dir)
    result = {"design": a.design, "processes": world, "rank": rank, "workers": a.workers, "batches": batches,
              "rows_kept": rows, "images_read": items, "file_mib": files / MiB, "decoded_mib": decoded / MiB,
              "peak_rss_mib": sampler.peak["VmRSS"] / 1024, "peak_shmem_mib": sampler.peak["RssShmem"] / 1024,
              "peak_anon_mib": sampler.peak["RssAnon"] / 1024, "rss_before_mib": before["VmRSS"] / 1024,
              "max_processes": sampler.max_processes, "seconds": seconds}
    with open(os.path.join(a.result_dir, f"{a.design}{world}_rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.close()


# ----------------------------------------------------------------------------------------------- driver

def machine():
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    return {"cpu_count": os.cpu_count(), "cpu_model": model, "mem_gib": round(mem_kib / (1 << 20), 1),
            "torch": torch.__version__}


def run_config(design, nproc, voc, labels, result_dir, a):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.abspath(__file__), "--worker", "--design", design, "--voc", voc, "--labels", labels,
           "--result_dir", result_dir, "--batches", str(a.batches), "--workers", str(a.workers),
           "--sleep", str(a.sleep), "--interval", str(a.interval)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    load = os.getloadavg()[0]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    rows = []
    for rank in range(nproc):
        with open(os.path.join(result_dir, f"{design}{nproc}_rank{rank}.json")) as f:
            rows.append(dict(json.load(f), load_before=load))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n_images", type=int, default=64, help="fake train images (>= 32 x --batches for no reuse)")
    p.add_argument("--batches", type=int, default=2, help="global batches of 32 each rank iterates")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    p.add_argument("--sleep", type=float, default=0.5, help="seconds per batch standing in for a training step")
    p.add_argument("--interval", type=float, default=0.05, help="seconds between memory samples")
    p.add_argument("--out", default=None, help="write the results (JSON) here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--design", choices=DESIGNS, help=argparse.SUPPRESS)
    for hidden in ("--voc", "--labels", "--result_dir"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a)
    if a.n_images < BATCH:
        p.error(f"--n_images must be at least one batch ({BATCH})")
    if a.batches > a.n_images // BATCH:
        p.error(f"--batches {a.batches} exceeds one epoch of --n_images {a.n_images} ({a.n_images // BATCH})")

    info = machine()
    started = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="loader_memory_")
    try:
        from fakevoc import make_voc_sized_ir_labels
        voc, labels = make_voc_sized_ir_labels(tmp, a.n_images)
        rows = []
        for design in DESIGNS:
            for nproc in NPROCS:
                rows += run_config(design, nproc, voc, labels, os.path.join(tmp, "results"), a)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = time.perf_counter() - started

    header = ("design", "processes", "rank", "images read", "file MiB", "MiB decoded", "peak RSS MiB",
              "peak shared MiB", "seconds")
    table = [header] + [(r["design"], str(r["processes"]), str(r["rank"]), str(r["images_read"]),
                         f"{r['file_mib']:.1f}", f"{r['decoded_mib']:.0f}", f"{r['peak_rss_mib']:.0f}",
                         f"{r['peak_shmem_mib']:.0f}", f"{r['seconds']:.1f}") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in table]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print("\n".join(lines))
    print(f"crop {CROP}, global batch {BATCH}, radius {RADIUS}, {a.n_images} images 500x375, {a.batches} batches, "
          f"{a.workers} workers/rank, sleep {a.sleep} s/batch; total {total:.0f} s")
    loads = ", ".join(f"{r['design']} x{r['processes']} {r['load_before']:.1f}" for r in rows if r["rank"] == 0)
    print(f"machine: {info['cpu_count']} CPUs ({info['cpu_model']}), {info['mem_gib']} GiB, torch {info['torch']}; "
          f"1-min load average before each run: {loads}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"machine": info, "settings": vars(a), "total_seconds": total, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
