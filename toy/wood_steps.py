"""Where does W-OoD fine-tuning blow up? train_wood's first steps, term by term (issue 14's diagnosis).

    python toy/wood_steps.py --steps 12 -- <run_sample flags of a train_wood run>

Runs run_sample.py's train_wood exactly as the flags say (same data order, same weights: the step's own
code), but records for each of the first --steps training steps, before the update: the three loss terms
and their weighted share of the loss, the gradient norm that each weighted term puts on the stage3+4 and
on the classifier parameters, the feature norm |GAP(stage4)| of the ID batch, the largest |logit| of the
ID batch and of the anti-adversarial OoD batch, and the classifier's weight norm. Stops after --steps (the
driver reports "interrupted"; nothing is saved). One line per step.
"""
import argparse
import sys
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402

import run_sample  # noqa: E402
from step import train_wood  # noqa: E402
from wood.losses import (anti_adversarial_ood_step, classification_loss, distance_loss, ood_negative_loss,  # noqa: E402
                         prototype_distances)


def grad_norm(term, params):
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    return sum((g.double() ** 2).sum().item() for g in grads if g is not None) ** 0.5


def main():
    argv = sys.argv[1:]
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    a = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    original = train_wood.wood_loss
    seen = [0]

    def recording_loss(model, img, label, ood_img, prototypes, args):
        if seen[0] == a.steps:
            raise KeyboardInterrupt
        n_classes = label.shape[1]
        logits, features = model.feature_list(img)
        distances = prototype_distances(features[-1], prototypes)
        cls = classification_loss(logits, label)
        dist = distance_loss(distances, label, n_classes, prototypes.shape[0] - n_classes, args.ood_dist_topk)
        ood_adv = anti_adversarial_ood_step(model, ood_img, args.ood_adv_step)
        ood_logits = model(ood_adv)
        ood = ood_negative_loss(ood_logits, args.ood_mask_class, img.shape[0])
        terms = {"cls": cls, "dist": args.distance_lambda * dist, "ood": args.ood_coeff * ood}
        backbone, classifier = model.wood_param_groups()
        norms = {k: (grad_norm(t, backbone), grad_norm(t, classifier)) for k, t in terms.items()}
        print(f"step {seen[0]:3d}: loss {sum(terms.values()).item():10.4g} | "
              + " | ".join(f"{k} {t.item():9.3g} (grad s34 {norms[k][0]:8.3g} cls {norms[k][1]:8.3g})"
                           for k, t in terms.items())
              + f" | |f| {features[-1].norm(dim=1).max().item():7.3g} max|logit| ID {logits.abs().max().item():7.3g}"
                f" OoD' {ood_logits.abs().max().item():7.3g} |W| {model.classifier.weight.norm().item():7.3g}",
              flush=True)
        seen[0] += 1
        return original(model, img, label, ood_img, prototypes, args)

    train_wood.wood_loss = recording_loss
    return run_sample.main(flags + ["--train_wood_pass", "true"])


if __name__ == "__main__":
    sys.exit(main())
