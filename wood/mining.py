"""Hard-OoD mining (docs/method.md §4.2): scores of the candidates, which are kept, and (on ToyVOC, whose pool
knows which candidates are hard) how well the kept list matches."""
import numpy as np
import torch


def hard_ood_scores(logits):
    """(score (N,), top class (N,)) = max and arg-max over the classes of sigmoid(logits (N, C))."""
    probs = torch.sigmoid(logits)
    score, top = probs.max(dim=1)
    return score, top


def select_hard_ood(scores, threshold, excluded, max_keep=None):
    """Indices of the kept candidates, highest score first (ties keep list order), and a reason per
    candidate: "kept", "below_threshold" (score <= threshold), "excluded" or "over_cap".

    scores: sequence of N floats; excluded: N booleans (listed in the exclusion file).
    """
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    reasons = ["below_threshold"] * len(scores)
    kept = []
    for i in order:
        if not scores[i] > threshold:
            continue
        if excluded[i]:
            reasons[i] = "excluded"
        elif max_keep is not None and len(kept) >= max_keep:
            reasons[i] = "over_cap"
        else:
            kept.append(int(i))
            reasons[i] = "kept"
    return kept, reasons


def mining_quality(kept_paths, manifest):
    """Precision / recall of the kept paths against a manifest [{"path", "hard", ...}] of the pool."""
    hard = {e["path"] for e in manifest if e["hard"]}
    kept = set(kept_paths)
    true_pos = len(kept & hard)
    return {"kept": len(kept), "hard": len(hard), "true_positives": true_pos,
            "precision": true_pos / len(kept) if kept else float("nan"),
            "recall": true_pos / len(hard) if hard else float("nan")}
