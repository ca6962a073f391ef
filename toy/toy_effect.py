"""Does W-OoD beat the baseline CAM on ToyVOC? The CAM stage over several data + training seeds.

    python toy/toy_effect.py [--seeds 0 1 2] [--bench_dir bench_out/toy_effect] [--data_args '...']
                               [-- extra run_sample flags]

The backbone weights are the preset's ToyNet pre-training (toy/toynet.py; the shipped file of the preset's
--pretrained, or for another --backbone_width one made once into <bench_dir>/toynet_w<width>.pth), shared by
the seeds as ImageNet weights are shared by real experiments (pass `-- --pretrained FILE` to use another
file, or `-- --pretrained none` to train from scratch).
For each seed: generate ToyVOC (toy.toyvoc, that seed) into <bench_dir>/seed<s>/, then run the CAM stage
through run_sample.py with the toy preset and that seed: train_cam -> make_cam + eval_cam from the ID
classifier (baseline) -> mine_ood -> train_wood -> make_cam + eval_cam from the W-OoD classifier. Prints per
seed the best mIoU of both (summary.json of the run), the share of CAM mass on cue pixels (toy/cue_mass.py)
and the wall time, and last `mean_diff=<W-OoD minus baseline, mIoU points> seeds_above=<n>/<seeds> failed=<n>`
(a seed whose run fails, e.g. a diverged fine-tuning, prints FAILED with the error and counts as not above).
Flags after `--` go to every run_sample.py call (e.g. `-- --real_momentum 0.9`). Everything for a seed is
written under its own folder; a finished step is skipped on a rerun (the steps' own resumption).
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import run_sample  # noqa: E402
from toy.cue_mass import measure  # noqa: E402
from toy.toynet import parse_args as toynet_defaults  # noqa: E402


class RunFailed(RuntimeError):
    """A command of a seed's run failed; the message is its last error line."""


def sh(cmd, log):
    """Run `cmd` in the repository root; its output goes to `log`; RunFailed with its error on failure."""
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        with open(log) as f:
            lines = [line.strip() for line in f if line.strip()]
        errors = [line for line in lines if line.startswith(("error:", "Traceback"))] or lines[-1:]
        raise RunFailed(f"exit {rc}: {errors[-1] if errors else 'no output'} (log: {log})")


def cue_share(voc_root, cam_dir):
    totals = measure(voc_root, cam_dir, "train")
    own, any_cue, total = totals.sum(0)
    return own / total, any_cue / total


def best_miou(work_dir, name):
    with open(os.path.join(work_dir, "summary.json")) as f:
        entries = [e for e in json.load(f) if e["name"] == name]
    return entries[-1]["miou"], entries[-1]["threshold"]


def run_seed(seed, bench_dir, extra, data_args=()):
    base = os.path.abspath(os.path.join(bench_dir, f"seed{seed}"))
    voc, ood, work = (os.path.join(base, d) for d in ("ToyVOC", "ood", "work"))
    os.makedirs(work, exist_ok=True)
    log = os.path.join(base, "log.txt")
    py = sys.executable
    times = {}
    start = time.time()
    if not os.path.isfile(os.path.join(voc, "toyvoc.json")):
        sh([py, "-m", "toy.toyvoc", "--out", voc, "--ood_out", ood, "--seed", str(seed), *data_args], log)
    times["data"] = time.time() - start
    common = [py, "run_sample.py", "--preset", "toy", "--seed", str(seed), "--voc12_root", voc,
              "--ood_pool_root", ood, "--ood_pool_list", os.path.join(ood, "candidates.txt"), "--ood_root", ood,
              "--work_dir", work, "--cam_weights_name", os.path.join(work, "cam.pth"),
              "--wood_weights_name", os.path.join(work, "wood.pth")]
    baseline_dir, wood_dir = os.path.join(work, "baseline_cam"), os.path.join(work, "wood_cam")
    start = time.time()
    sh(common + ["--train_cam_pass", "true", "--make_cam_pass", "true", "--eval_cam_pass", "true",
                 "--make_cam_from", "id", "--cam_out_dir", baseline_dir] + extra, log)
    times["baseline"] = time.time() - start
    start = time.time()
    sh(common + ["--mine_ood_pass", "true", "--train_wood_pass", "true", "--make_cam_pass", "true",
                 "--eval_cam_pass", "true", "--make_cam_from", "wood", "--cam_out_dir", wood_dir] + extra, log)
    times["wood"] = time.time() - start
    return {"baseline": best_miou(work, "baseline_cam"), "wood": best_miou(work, "wood_cam"),
            "baseline_cue": cue_share(voc, baseline_dir), "wood_cue": cue_share(voc, wood_dir), "times": times}


def main():
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--bench_dir", default=os.path.join("bench_out", "toy_effect"))
    p.add_argument("--data_args", default="", help="extra toy.toyvoc flags, e.g. '--class_colour_prob 0.5'")
    a = p.parse_args(argv)
    if "--pretrained" not in extra:
        toy = run_sample.parse_args(["--preset", "toy"] + extra)   # the width the runs use
        if toy.backbone_width == toynet_defaults([]).width:   # the shipped file: toy.toynet's defaults
            toynet = os.path.join(ROOT, toy.pretrained)
        else:
            toynet = os.path.abspath(os.path.join(a.bench_dir, f"toynet_w{toy.backbone_width}.pth"))
        os.makedirs(a.bench_dir, exist_ok=True)
        start = time.time()
        # checks the file's record (refused if made by other inputs), or pre-trains a missing one
        sh([sys.executable, "-m", "toy.toynet", "--out", toynet, "--width", str(toy.backbone_width)],
           os.path.join(a.bench_dir, "toynet_log.txt"))
        print(f"ToyNet weights: {toynet} ({time.time() - start:.0f} s)", flush=True)
        extra = ["--pretrained", toynet] + extra
    diffs, failed = [], []
    for seed in a.seeds:
        try:
            r = run_seed(seed, a.bench_dir, extra, a.data_args.split())
        except RunFailed as e:   # e.g. a diverged fine-tuning: no number is reported for it
            failed.append(seed)
            print(f"seed {seed}: FAILED, no result: {e}", flush=True)
            continue
        diff = r["wood"][0] - r["baseline"][0]
        diffs.append(diff)
        t = r["times"]
        print(f"seed {seed}: baseline mIoU {r['baseline'][0]:.1f} (thr {r['baseline'][1]}) cue share own/any "
              f"{r['baseline_cue'][0]:.3f}/{r['baseline_cue'][1]:.3f} | W-OoD mIoU {r['wood'][0]:.1f} "
              f"(thr {r['wood'][1]}) cue share {r['wood_cue'][0]:.3f}/{r['wood_cue'][1]:.3f} | diff {diff:+.1f} | "
              f"time data {t['data']:.0f} s, train_cam+baseline CAM {t['baseline']:.0f} s, "
              f"mine+train_wood+W-OoD CAM {t['wood']:.0f} s", flush=True)
    mean = f"{sum(diffs) / len(diffs):.2f}" if diffs else "n/a"
    print(f"mean_diff={mean} seeds_above={sum(d > 0 for d in diffs)}/{len(a.seeds)} failed={len(failed)}"
          + (f" (seeds {' '.join(map(str, failed))})" if failed else ""))


if __name__ == "__main__":
    main()
