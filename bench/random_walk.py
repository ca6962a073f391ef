"""Sparse random walk vs the original's dense formulation (docs/method.md §5.3) at VOC scale, on this machine.

    python bench/random_walk.py [--height 125 --width 94 --classes 2 --radius 5 --beta 10 --exp_times 8]
                                [--threads 2 --repeats 3 --dense_cache sess/bench_dense_walk.npz]

A 125 x 94 map is a 500 x 375 VOC image at stride 4. Each variant runs in its own subprocess (same
synthetic boundary map and seeds, same torch thread count), so that its memory is its own:
- time: wall time of the walk (transition matrix construction included): the fastest of --repeats
  runs of the sparse walk, one run of the dense one (it takes most of an hour on 2 busy cores);
- peak memory: the process's peak resident set during the walk minus its resident set just before
  (Linux VmHWM reset through /proc/self/clear_refs; falls back to ru_maxrss differences), i.e. what
  the walk itself adds on top of Python + torch + the inputs. Both workers first run the walk on a
  12 x 12 map (code pages, thread pools). The sparse walk's first full-size run also pays one-time
  costs (allocator growth, kernels first touched at that size): it is reported apart ("first run"),
  and the ratio uses the later runs ("steady state": what every further image of make_sem_seg costs).
  The dense reference frees its intermediates as early as it can (the original holds about four
  n x n matrices at once), which favours the dense side. The sparse worker runs with glibc's mmap
  threshold fixed at 64 KiB (SPARSE_MALLOC_ENV) so that its resident set follows its live memory;
  this costs it some time (mmap per allocation), which only makes the speedup conservative.
Then compares the results: largest absolute difference (also relative to the maximum) and the share
of equal pixels of the pseudo-mask labels (x4 up-sampling, bg threshold, arg-max, as make_sem_seg).
`--dense_cache FILE` keeps the dense result and its measurements for the same configuration, so that
re-runs skip it. The last line reads
`speedup=<x> memory_ratio=<x> label_agreement=<percent> max_abs_diff=<value>`.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# glibc: allocations of 64 KiB or more are mmapped and returned on free, so the resident set follows
# the live memory (by default freed heap blocks are reused unseen, and repeated runs show ~0 growth).
# The dense worker's n x n matrices are far above glibc's largest automatic threshold (32 MiB): they
# are mmapped either way.
SPARSE_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def make_inputs(height, width, n_classes, seed=0):
    """A boundary map with smooth noise and a few straight walls, and sparse peaked seeds (float32)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    boundary = torch.rand(height, width, generator=g) ** 4 * 0.5
    for _ in range(4):
        if torch.rand(1, generator=g).item() < 0.5:
            boundary[int(torch.randint(0, height, (1,), generator=g)), :] = 0.9
        else:
            boundary[:, int(torch.randint(0, width, (1,), generator=g))] = 0.9
    seeds = torch.rand(n_classes, height, width, generator=g) ** 8
    return seeds, boundary


def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak():
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(variant, cfg, out_path):
    import torch

    from misc import indexing
    torch.set_num_threads(cfg["threads"])
    seeds, boundary = make_inputs(cfg["height"], cfg["width"], cfg["classes"])
    walk = indexing.random_walk if variant == "sparse" else indexing.dense_random_walk
    # warm-up of torch's kernels on a tiny map (not measured)
    walk(seeds[:, :12, :12].contiguous(), boundary[:12, :12].contiguous(), cfg["radius"], cfg["beta"], 1)
    times, extra = [], []
    for _ in range(cfg["repeats"] if variant == "sparse" else 1):
        exact = _reset_peak()
        rss_before = _rss_kib("VmRSS")
        maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        with torch.inference_mode():
            result = walk(seeds, boundary, cfg["radius"], cfg["beta"], cfg["exp_times"])
        times.append(time.perf_counter() - start)
        if exact:
            extra.append(_rss_kib("VmHWM") - rss_before)
        else:
            extra.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_before)
    np.save(out_path, result.numpy())
    steady = extra[1:] or extra
    print(json.dumps({"seconds": min(times), "all_seconds": times, "extra_peak_kib": max(steady),
                      "first_run_extra_peak_kib": extra[0], "all_extra_peak_kib": extra, "exact_peak": exact,
                      "process_peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "threads": torch.get_num_threads()}))


def run_variant(variant, cfg, folder):
    out_path = os.path.join(folder, variant + ".npy")
    env = dict(os.environ)
    if variant == "sparse":
        env.update(SPARSE_MALLOC_ENV)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", variant,
                           "--worker_out", out_path, "--cfg", json.dumps(cfg)],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode:
        sys.exit(f"{variant} worker failed:\n{proc.stderr}")
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    return stats, np.load(out_path)


def _read_cache(path, key):
    if not path or not os.path.isfile(path):
        return None
    with np.load(path, allow_pickle=False) as data:
        if str(data["cfg"]) != key:
            return None
        return json.loads(str(data["stats"])), data["result"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--height", type=int, default=125)
    p.add_argument("--width", type=int, default=94)
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--radius", type=int, default=5)
    p.add_argument("--beta", type=int, default=10)
    p.add_argument("--exp_times", type=int, default=8)
    p.add_argument("--bg_thres", type=float, default=0.22)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of both variants")
    p.add_argument("--repeats", type=int, default=3, help="sparse runs (the fastest counts); dense runs once")
    p.add_argument("--dense_cache", default=None, help="npz keeping the dense result + measurements")
    p.add_argument("--worker", choices=["sparse", "dense"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker_out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cfg", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, json.loads(args.cfg), args.worker_out)
        return
    cfg = {k: getattr(args, k) for k in ("height", "width", "classes", "radius", "beta", "exp_times", "threads",
                                         "repeats")}
    n = cfg["height"] * cfg["width"]
    print(f"map {cfg['height']} x {cfg['width']} ({n} pixels; dense T: {n * n * 4 / 2 ** 20:.0f} MiB), "
          f"{cfg['classes']} classes, radius {cfg['radius']}, beta {cfg['beta']}, "
          f"{2 ** cfg['exp_times']} steps")
    dense_key = json.dumps({k: v for k, v in cfg.items() if k != "repeats"}, sort_keys=True)
    with tempfile.TemporaryDirectory() as folder:
        sparse_stats, sparse = run_variant("sparse", cfg, folder)
        print(f"sparse: {sparse_stats}", flush=True)
        cached = _read_cache(args.dense_cache, dense_key)
        if cached:
            dense_stats, dense = cached
            print(f"dense (from {args.dense_cache}): {dense_stats}", flush=True)
        else:
            dense_stats, dense = run_variant("dense", cfg, folder)
            print(f"dense:  {dense_stats}", flush=True)
            if args.dense_cache:
                from misc.utils import save_npz
                save_npz(args.dense_cache, result=dense, stats=json.dumps(dense_stats), cfg=dense_key)

    import torch

    from misc.indexing import walk_to_label
    size = (cfg["height"] * 4, cfg["width"] * 4)
    keys = np.arange(cfg["classes"])
    labels_sparse = walk_to_label(torch.from_numpy(sparse), keys, size, args.bg_thres)
    labels_dense = walk_to_label(torch.from_numpy(dense), keys, size, args.bg_thres)
    agreement = 100.0 * float((labels_sparse == labels_dense).mean())
    max_abs_diff = float(np.abs(sparse - dense).max())
    speedup = dense_stats["seconds"] / sparse_stats["seconds"]
    memory_ratio = dense_stats["extra_peak_kib"] / max(sparse_stats["extra_peak_kib"], 1)
    print(f"time: dense {dense_stats['seconds']:.2f} s, sparse {sparse_stats['seconds']:.3f} s "
          f"({dense_stats['threads']} threads)")
    print(f"peak memory added by the walk: dense {dense_stats['extra_peak_kib'] / 1024:.1f} MiB, sparse "
          f"{sparse_stats['extra_peak_kib'] / 1024:.1f} MiB steady state, "
          f"{sparse_stats['first_run_extra_peak_kib'] / 1024:.1f} MiB first run (ratio "
          f"{dense_stats['extra_peak_kib'] / max(sparse_stats['first_run_extra_peak_kib'], 1):.1f}) "
          f"({'VmHWM reset' if sparse_stats['exact_peak'] else 'ru_maxrss difference'})")
    print(f"values: max |dense| {np.abs(dense).max():.6g}, max abs diff {max_abs_diff:.3g} "
          f"({max_abs_diff / np.abs(dense).max():.2g} of the max); labels of classes present: "
          f"{np.bincount(labels_dense.ravel()).tolist()}")
    print(f"speedup={speedup:.1f} memory_ratio={memory_ratio:.1f} label_agreement={agreement:.4f} "
          f"max_abs_diff={max_abs_diff:.3g}")


if __name__ == "__main__":
    main()
