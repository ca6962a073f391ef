"""W-OoD fine-tuning (docs/method.md §4.3), W-OoD's train_wood: the ID classifier learns to tell the classes
from hard OoD images.

Reads the ID classifier (--cam_weights_name), the hard OoD list (--ood_list under --ood_root) and --train_list;
computes the class and K-means OoD prototypes with the starting weights, then trains stage3, stage4 and the
classifier on L = BCE + distance_lambda * L_dist + ood_coeff * L_ood (wood/losses.py). As released, the weights
kept are those of the best train-set CAM mIoU among the evaluations of the last quarter of the last epoch
(--select_by_gt, ground truth used; false: the final weights). Writes --wood_weights_name with its provenance
record (kept, and the step skipped, when made by the same inputs) and, for inspection, <work_dir>/
wood_prototypes.npz. A non-finite loss, gradient, validation loss or weight stops the step, nothing saved.
"""
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from misc import dist, provenance, sampling, steptools
from misc.cam import cam_maps, keep_label_classes
from misc.metrics import accumulated_sweep, best_threshold, sweep_thresholds
from misc.torchutils import make_poly_optimizer, precision_context, require_finite, train_only
from misc.utils import InputError, save_npz
from net.classifier import build_classifier, load_classifier
from net.resnet50_cam import PARAM_GROUP_LR_MULT
from voc12.dataloader import VOC12ClassificationDataset, VOC12ClassificationDatasetMSF, load_gt, load_img_name_list
from wood import losses
from wood.data import OoDClassificationDataset, load_ood_list
from wood.prototypes import id_prototypes, ood_prototypes

SELECT_FROM_FRACTION = 3 / 4   # checkpoint selection runs in the last quarter of the last epoch
PROTOTYPES_FILE = "wood_prototypes.npz"


# ------------------------------------------------------------------------------------------ maths

def global_mean(loss, parts):
    """The global batch's loss (tensor) and parts (floats) from the ranks' values on their equal slices."""
    if dist.world() == 1:
        return loss, parts
    values = dist.total(torch.tensor([loss.item(), *parts.values()], dtype=torch.float64)) / dist.world()
    return values[0], dict(zip(parts, values[1:].tolist()))


def selection_due(epoch, step, n_epochs, steps_per_epoch, every):
    """Whether the released code evaluates after 0-based `step` of 0-based `epoch`."""
    return epoch == n_epochs - 1 and step > steps_per_epoch * SELECT_FROM_FRACTION and step % every == 0


# -------------------------------------------------------------------------------------------- I/O

def endless(batches_of_epoch):
    """Batches of `batches_of_epoch()` (a fresh, reshuffled pass each time), forever."""
    while True:
        empty = True
        for batch in batches_of_epoch():
            empty = False
            yield batch
        if empty:
            raise InputError("the OoD loader yields no batch")


class CheckpointSelector:
    """Scores the model's CAMs on args.chainer_eval_set against the ground truth; keeps the best weights."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        self.ids = load_img_name_list(args.voc12_root, args.chainer_eval_set)
        # under torchrun each rank scores its share of the images; the confusion matrices are added
        self.dataset = VOC12ClassificationDatasetMSF(dist.shard(self.ids), args.voc12_root, scales=args.select_scales)
        for img_id in self.ids[:1]:
            load_gt(args.voc12_root, img_id)  # fail now, not after the first epochs, without ground truth
        self.cam_model = build_classifier(args.backbone, args.backbone_width, "none", "cam").to(device).eval()
        self.best = None      # (miou, threshold, tag)
        self.best_state = None
        self.history = []

    def _items(self):
        loader = DataLoader(self.dataset, batch_size=None, shuffle=False, num_workers=self.args.num_workers)
        with torch.inference_mode():
            for pack in tqdm(loader, desc="train_wood select", unit="img", leave=False):
                size = (int(pack["size"][0]), int(pack["size"][1]))
                strided, high_res = cam_maps(self.cam_model, pack["img"], size)
                keys, _, high_res = keep_label_classes(strided, high_res, pack["label"])
                yield high_res.float().cpu().numpy(), keys.numpy(), load_gt(self.args.voc12_root, pack["name"])

    def offer(self, model, tag):
        """Score `model` now; keep a CPU copy of its weights if its mIoU beats the best so far."""
        state = model.state_dict()
        self.cam_model.load_state_dict(state)
        sweep = accumulated_sweep if self.args.select_accumulate else sweep_thresholds
        # under torchrun each rank scored its share of the images: their confusion matrices are added
        threshold, scores = best_threshold(sweep(self._items(), self.args.select_eval_thres,
                                                 reduce=dist.total_array))
        miou = scores["miou"] if np.isfinite(scores["miou"]) else -np.inf  # nothing scorable: never preferred
        self.history.append((tag, miou, threshold))
        print(f"train_wood: {tag}: CAM mIoU {100 * miou:.2f} at threshold {threshold} on "
              f"{self.args.chainer_eval_set}")
        if self.best is None or miou > self.best[0]:
            self.best = (miou, threshold, tag)
            self.best_state = {k: v.detach().cpu().clone() for k, v in state.items()}


def compute_prototypes(model, args, device, ood_paths):
    """(C + K, D) prototype matrix with the starting weights (eval mode); also saved for inspection."""
    ood = ood_prototypes(model, device, ood_paths, args.ood_root, args.ood_long_side, args.cluster_K,
                         args.kmeans_iter, args.num_workers)
    ids = id_prototypes(model, device, args.train_list, args.voc12_root, args.num_workers)
    dist.require_same(torch.cat([ids, ood]), "the prototypes")
    if dist.is_main():
        save_npz(os.path.join(args.work_dir, PROTOTYPES_FILE), id=ids.numpy(), ood=ood.numpy())
    print(f"train_wood: prototypes: {ids.shape[0]} classes from {args.train_list}, {ood.shape[0]} OoD "
          f"centroids from {len(ood_paths)} OoD images ({args.kmeans_iter} K-means iterations)")
    return torch.cat([ids, ood]).to(device)


def _suspects(args):
    return {"--wood_learning_rate": args.wood_learning_rate, "--ood_coeff": args.ood_coeff,
            "--distance_lambda": args.distance_lambda, "--ood_adv_step": args.ood_adv_step}


def provenance_inputs(args):
    """What decides train_wood's weights (misc/provenance.py)."""
    return {"id_weights": provenance.input_file(args.cam_weights_name, "the ID classifier weights (.pth); run "
                                                                        "train_cam (--train_cam_pass true) first"),
            "ood_list": provenance.input_file(args.ood_list, "the hard OoD list; run mine_ood first"),
            "train_list": provenance.list_digest(load_img_name_list(args.voc12_root, args.train_list)),
            "chainer_eval_set": provenance.list_digest(load_img_name_list(args.voc12_root, args.chainer_eval_set)),
            **provenance.flag_values(args, [
                "ood_root",
                "backbone_width", "cam_crop_size", "cam_resize_long", "ood_long_side", "wood_batch_size",
                "ood_batch_size", "wood_num_epoches", "wood_learning_rate", "wood_weight_decay", "cluster_K",
                "kmeans_iter", "distance_lambda", "ood_dist_topk", "ood_coeff", "ood_adv_step", "ood_mask_class",
                "select_by_gt", "select_scales", "select_eval_thres", "select_every", "select_accumulate",
                "select_before_update", "wood_empty_cluster",
                "real_momentum", "seed"]),
            **provenance.non_default_flags(args, {"train_amp": "none", "backbone": "resnet50"})}


def run(args):
    inputs = provenance_inputs(args)
    if steptools.keep_existing(args.wood_weights_name, "train_wood", inputs, args, "--wood_weights_name"):
        return
    device = torch.device(args.device)
    dist.per_rank(args.wood_batch_size, "--wood_batch_size")
    dist.per_rank(args.ood_batch_size, "--ood_batch_size")
    # inputs first, so that a bad list fails before minutes of feature extraction
    ood_paths = load_ood_list(args.ood_root, args.ood_list)
    if len(ood_paths) < args.ood_batch_size:
        raise InputError(f"the OoD list {args.ood_list} has {len(ood_paths)} images, fewer than one OoD batch "
                         f"(--ood_batch_size {args.ood_batch_size}): lower it or add images")
    train_dataset = VOC12ClassificationDataset.for_training(
        args.train_list, args.voc12_root, resize_long=args.cam_resize_long, crop_size=args.cam_crop_size)
    val_dataset = VOC12ClassificationDataset.for_validation(args.val_list, args.voc12_root,
                                                            crop_size=args.cam_crop_size)
    ood_dataset = OoDClassificationDataset(args.ood_root, ood_paths, resize_long=args.cam_resize_long,
                                           crop_size=args.cam_crop_size)
    steps_per_epoch = len(train_dataset) // args.wood_batch_size
    if steps_per_epoch == 0:
        raise InputError(f"the training list {args.train_list} has {len(train_dataset)} images, fewer than "
                         f"one batch (--wood_batch_size {args.wood_batch_size})")
    max_step = steps_per_epoch * args.wood_num_epoches
    selector = CheckpointSelector(args, device) if args.select_by_gt else None

    constants = losses.WoodConstants(args.ood_adv_step, args.ood_dist_topk, args.ood_mask_class,
                                     args.distance_lambda, args.ood_coeff)
    model = load_classifier(args.cam_weights_name, args.backbone, args.backbone_width, args.device, "features")
    prototypes = compute_prototypes(model, args, device, ood_paths)

    # each rank reads only its slice of every global ID and OoD batch (misc/sampling.py); every pass over a
    # loader is its next epoch, the OoD one restarting whenever it is exhausted
    train_loader = sampling.training_loader(steptools.ErrorsAsValues(train_dataset), args.wood_batch_size, args.seed,
                                            "train_wood", args.num_workers, device,
                                            collate_fn=steptools.collate_errors)
    ood_loader = sampling.training_loader(steptools.ErrorsAsValues(ood_dataset), args.ood_batch_size, args.seed,
                                          "train_wood_ood", args.num_workers, device,
                                          collate_fn=steptools.collate_errors)
    ood_batches = endless(lambda: steptools.raise_input_errors(ood_loader))
    val_loader = sampling.rank_rows_loader(val_dataset, args.wood_batch_size, args.num_workers, device)
    # stage1 and stage2 stay as they are: no gradient for them (the release computes and discards it)
    optimizer = make_poly_optimizer(zip(train_only(model, model.wood_param_groups()), PARAM_GROUP_LR_MULT),
                                    args.wood_learning_rate, args.wood_weight_decay, max_step, args.real_momentum)
    print(f"train_wood: {len(train_dataset)} ID images, {len(ood_paths)} OoD images, {steps_per_epoch} steps x "
          f"{args.wood_num_epoches} epochs, batch {args.wood_batch_size} + {args.ood_batch_size} OoD, "
          f"checkpoint selection by GT: {args.select_by_gt}, device {device}, {dist.world()} process(es)")

    model.train()
    for epoch in range(args.wood_num_epoches):
        sums = {"loss": 0.0, "cls": 0.0, "dist": 0.0, "ood": 0.0}
        bar = tqdm(steptools.raise_input_errors(train_loader), total=steps_per_epoch, unit="batch",
                   desc=f"train_wood epoch {epoch + 1}/{args.wood_num_epoches}")
        for step, pack in enumerate(bar):
            due = selector is not None and selection_due(epoch, step, args.wood_num_epoches, steps_per_epoch,
                                                         args.select_every)
            if due and args.select_before_update:  # as released: the weights before this step's update
                selector.offer(model, f"epoch {epoch + 1} step {step}, before its update")
                model.train()
            ood_batch = next(ood_batches)["img"]
            sampling.require_same_batch(train_loader, f"ID batch {step + 1} of epoch {epoch + 1}")
            sampling.require_same_batch(ood_loader, f"the OoD batch of step {step + 1} of epoch {epoch + 1}")
            img = pack["img"].to(device, non_blocking=True)
            label = pack["label"].to(device, non_blocking=True)
            ood_img = ood_batch.to(device, non_blocking=True)
            with precision_context(device, args.train_amp):
                loss, parts = losses.wood_loss(model, img, label, ood_img, prototypes, constants)
            optimizer.zero_grad()  # also clears what the anti-adversarial step would leave
            (loss / dist.world()).backward()  # this rank's share of the global batch's loss
            dist.sum_gradients(model.parameters())
            loss, parts = global_mean(loss, parts)
            require_finite("train_wood", epoch + 1, step + 1, _suspects(args), loss, model.parameters())
            optimizer.step()
            sums["loss"] += loss.item()
            for k, v in parts.items():
                sums[k] += v
            bar.set_postfix(loss=f"{sums['loss'] / (step + 1):.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            if due and not args.select_before_update:
                selector.offer(model, f"epoch {epoch + 1} step {step}, after its update")
                model.train()
        # scored as train_cam scores its validation (the release's multilabel soft margin)
        val = steptools.validation_loss(model, val_loader, device, F.multilabel_soft_margin_loss)
        means = " ".join(f"{k} {v / steps_per_epoch:.4f}" for k, v in sums.items())
        print(f"train_wood epoch {epoch + 1}/{args.wood_num_epoches}: train {means}; val loss {val:.4f}")
        steptools.check_epoch("train_wood", epoch + 1, _suspects(args), model, val)

    if selector is None:
        state = model.state_dict()
        print("train_wood: checkpoint selection off (--select_by_gt false): saving the final weights")
    else:
        selector.offer(model, "after training")
        miou, threshold, tag = selector.best
        state = selector.best_state
        print(f"train_wood: selected the weights of {tag} (CAM mIoU {100 * miou:.2f} at threshold {threshold} "
              f"on {args.chainer_eval_set}, ground truth used) among {len(selector.history)} evaluations")
    steptools.save_trained(args.wood_weights_name, state, "train_wood", inputs, _suspects(args),
                           args.wood_num_epoches)
