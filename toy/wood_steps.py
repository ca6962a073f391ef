"""Where does W-OoD fine-tuning blow up? train_wood's first steps, term by term.

    python toy/wood_steps.py --steps 12 -- <run_sample flags of a train_wood run>

Runs run_sample.py's train_wood exactly as the flags say (same data order, same weights: the step's own
code), but records for each of the first --steps training steps, before the update: the three loss terms
and their weighted share of the loss, the gradient norm that each weighted term puts on the stage3+4 and
on the classifier parameters, the feature norm |GAP(stage4)| of the ID batch, the largest |logit| of the
ID batch and of the anti-adversarial OoD batch, and the classifier's weight norm. Stops after --steps (the
driver reports "interrupted"; nothing is saved). One line per step.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402

import run_sample  # noqa: E402
from wood import losses  # noqa: E402


def grad_norm(term, params):
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    return sum((g.double() ** 2).sum().item() for g in grads if g is not None) ** 0.5


def main():
    argv = sys.argv[1:]
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    a = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    seen = [0]

    def recording_loss(model, img, label, ood_img, prototypes, constants):
        if seen[0] == a.steps:
            raise KeyboardInterrupt
        terms, came_from = losses.wood_terms(model, img, label, ood_img, prototypes, constants)
        weighted = losses.weighted_terms(terms, constants)
        loss = sum(weighted.values())
        backbone, classifier = model.wood_param_groups()
        norms = {k: (grad_norm(t, backbone), grad_norm(t, classifier)) for k, t in weighted.items()}
        print(f"step {seen[0]:3d}: loss {loss.item():10.4g} | "
              + " | ".join(f"{k} {t.item():9.3g} (grad s34 {norms[k][0]:8.3g} cls {norms[k][1]:8.3g})"
                           for k, t in weighted.items())
              + f" | |f| {came_from['features'].norm(dim=1).max().item():7.3g} max|logit| ID "
                f"{came_from['logits'].abs().max().item():7.3g} OoD' {came_from['ood_logits'].abs().max().item():7.3g}"
                f" |W| {model.classifier.weight.norm().item():7.3g}", flush=True)
        seen[0] += 1
        return loss, {k: v.item() for k, v in terms.items()}

    losses.wood_loss = recording_loss  # train_wood calls losses.wood_loss
    return run_sample.main(flags + ["--train_wood_pass", "true"])


if __name__ == "__main__":
    sys.exit(main())
