"""Precision / recall of OoD mining against the ToyVOC manifest, for a range of thresholds.

    python toy/mine_ood_quality.py --scores result/toy/ood_scores.tsv --manifest WOoD_dataset/toy/manifest.json

Reads the score table written by step/mine_ood.py (every candidate's max sigmoid score) and the pool's
manifest ([{"path", "hard", "cue"}]); a candidate counts as mined when its score exceeds the threshold
(exclusions and the cap are ignored here). Also prints the recall per cue class at each threshold.
"""
import argparse
import csv
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from wood.mining import mining_quality  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scores", required=True, help="ood_scores.tsv of mine_ood")
    p.add_argument("--manifest", required=True, help="<ood_pool_root>/manifest.json")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    a = p.parse_args()
    with open(a.scores) as f:
        scores = {row["path"]: float(row["score"]) for row in csv.DictReader(f, delimiter="\t")}
    with open(a.manifest) as f:
        manifest = json.load(f)
    cues = sorted({e["cue"] for e in manifest if e["hard"] and e.get("cue")})
    print("threshold  kept  precision  recall  " + "  ".join(f"{c:>9}" for c in cues))
    for t in a.thresholds:
        kept = [path for path, s in scores.items() if s > t]
        q = mining_quality(kept, manifest)
        per_cue = []
        for c in cues:
            hard = [e["path"] for e in manifest if e["hard"] and e.get("cue") == c]
            per_cue.append(sum(scores.get(h, 0) > t for h in hard) / len(hard))
        print(f"{t:9.2f}  {q['kept']:4d}  {q['precision']:9.3f}  {q['recall']:6.3f}  "
              + "  ".join(f"{r:9.3f}" for r in per_cue))


if __name__ == "__main__":
    main()
