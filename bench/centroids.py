"""Centroid refinement (docs/method.md §9): the release's numpy loop vs misc/instance.py's torch version, on this
machine.

    python bench/centroids.py [--height 94 --width 125 --iterations 300 --repeats 3 --threads 1 --device cpu]

A 94 x 125 field is a 375 x 500 VOC image at stride 4. The field points every cell to the nearest of a few
centres (as a trained IRN's does inside objects) plus noise, float32. Both versions run --repeats times on the
same field after one warm-up; the fastest run of each is reported, then whether the two give the same centroids
(they must: tests/test_instance.py checks it bit for bit). The literal loop is tests/test_instance.py's
transcription of the release. The last line reads `numpy_s=<s> torch_s=<s> speedup=<x> equal=<bool>`.
"""
import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))


def make_field(height, width, n_centres=4, seed=0):
    from test_instance import instance_field
    rng = np.random.default_rng(seed)
    centres = np.stack([rng.uniform(0, height - 1, n_centres), rng.uniform(0, width - 1, n_centres)], axis=1)
    return instance_field(height, width, centres, rng, noise=0.5)


def fastest(fn, repeats):
    fn()  # warm-up: allocator, thread pools, CUDA context
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--height", type=int, default=94)
    p.add_argument("--width", type=int, default=125)
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (numpy's loop is one thread)")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()

    import torch
    from test_instance import release_find_centroids_with_refinement

    from misc.instance import find_centroids_with_refinement
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    field = make_field(a.height, a.width)
    field_t = torch.from_numpy(field).to(device)

    def run_torch():
        out = find_centroids_with_refinement(field_t, a.iterations)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    numpy_s, expected = fastest(lambda: release_find_centroids_with_refinement(field.copy(), a.iterations),
                                a.repeats)
    torch_s, got = fastest(run_torch, a.repeats)
    equal = bool(np.array_equal(got.cpu().numpy(), expected))
    print(f"field {a.height} x {a.width}, {a.iterations} iterations, torch on {device} ({a.threads} thread(s)), "
          f"fastest of {a.repeats}: numpy loop {numpy_s:.3f} s, torch {torch_s:.3f} s")
    print(f"numpy_s={numpy_s:.4f} torch_s={torch_s:.4f} speedup={numpy_s / torch_s:.2f} equal={equal}")


if __name__ == "__main__":
    main()
