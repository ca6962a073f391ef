"""Train the in-distribution classifier (docs/method.md §4.1), IRN's step/train_cam.py.

train_aug with the classification training recipe (random resize-long, flip, random crop),
multilabel soft-margin loss, PolyOptimizer (backbone lr x1, classifier lr x10, docs/method.md §3). After each
epoch the same loss on the val list (top-left crop). The state dict is saved atomically at the end;
the step is the unit of resumption: if the weights file exists and its provenance record
(misc/provenance.py) matches the flags, it is kept and training is skipped.
"""
import torch
import torch.nn.functional as F
from tqdm import tqdm

from misc import dist, provenance, sampling, steptools
from misc.torchutils import make_poly_optimizer, require_finite
from misc.utils import InputError
from net.classifier import build_classifier
from net.resnet50_cam import PARAM_GROUP_LR_MULT
from voc12.dataloader import VOC12ClassificationDataset, load_img_name_list


def classification_loss(logits, labels):
    return F.multilabel_soft_margin_loss(logits, labels)


def _suspects(args):
    return {"--cam_learning_rate": args.cam_learning_rate, "--cam_weight_decay": args.cam_weight_decay}


def provenance_inputs(args):
    """What decides train_cam's weights (misc/provenance.py)."""
    return {"pretrained": provenance.file_digest(args.pretrained),
            "train_list": provenance.list_digest(load_img_name_list(args.voc12_root, args.train_list)),
            **provenance.flag_values(args, ["backbone_width", "cam_batch_size", "cam_num_epoches", "cam_learning_rate",
                                            "cam_weight_decay", "cam_crop_size", "cam_resize_long", "real_momentum",
                                            "seed"]),
            **provenance.non_default_flags(args, {"train_amp": "none", "backbone": "resnet50"})}


def run(args):
    inputs = provenance_inputs(args)
    if steptools.keep_existing(args.cam_weights_name, "train_cam", inputs, args, "--cam_weights_name"):
        return
    device = torch.device(args.device)
    dist.per_rank(args.cam_batch_size, "--cam_batch_size")
    train_dataset = VOC12ClassificationDataset.for_training(
        args.train_list, args.voc12_root, resize_long=args.cam_resize_long, crop_size=args.cam_crop_size)
    val_dataset = VOC12ClassificationDataset.for_validation(args.val_list, args.voc12_root,
                                                            crop_size=args.cam_crop_size)
    steps_per_epoch = len(train_dataset) // args.cam_batch_size
    if steps_per_epoch == 0:
        raise InputError(f"the training list {args.train_list} has {len(train_dataset)} images, fewer than "
                         f"one batch (--cam_batch_size {args.cam_batch_size})")
    max_step = steps_per_epoch * args.cam_num_epoches
    # each rank reads only its slice of every global batch (misc/sampling.py)
    train_loader = sampling.training_loader(train_dataset, args.cam_batch_size, args.seed, "train_cam",
                                            args.num_workers, device)
    # every val image counts (the original also drops val's last incomplete batch; report only)
    val_loader = sampling.rank_rows_loader(val_dataset, args.cam_batch_size, args.num_workers, device)

    model = build_classifier(args.backbone, args.backbone_width, args.pretrained, "train_id").to(device)
    optimizer = make_poly_optimizer(zip(model.id_param_groups(), PARAM_GROUP_LR_MULT), args.cam_learning_rate,
                                    args.cam_weight_decay, max_step, args.real_momentum)
    print(f"train_cam: {len(train_dataset)} images, {steps_per_epoch} steps x {args.cam_num_epoches} epochs, "
          f"batch {args.cam_batch_size}, pretrained {args.pretrained}, width {args.backbone_width}, "
          f"device {device}, {dist.world()} process(es)")
    model.train()
    for epoch in range(args.cam_num_epoches):
        bar = tqdm(train_loader, desc=f"train_cam epoch {epoch + 1}/{args.cam_num_epoches}", unit="batch")
        epoch_loss = 0.0
        for step, pack in enumerate(bar, 1):
            sampling.require_same_batch(train_loader, f"batch {step} of epoch {epoch + 1}")
            loss = steptools.training_step(model, optimizer, pack, device,
                                           lambda net, batch: classification_loss(net(batch["img"]), batch["label"]),
                                           args.train_amp)
            require_finite("train_cam", epoch + 1, step, _suspects(args), loss, model.parameters())
            optimizer.step()
            epoch_loss += loss.item()
            bar.set_postfix(loss=f"{epoch_loss / step:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        val = steptools.validation_loss(model, val_loader, device, classification_loss)
        print(f"train_cam epoch {epoch + 1}/{args.cam_num_epoches}: train loss {epoch_loss / steps_per_epoch:.4f}, "
              f"val loss {val:.4f}")
        steptools.check_epoch("train_cam", epoch + 1, _suspects(args), model, val)
    steptools.save_trained(args.cam_weights_name, model.state_dict(), "train_cam", inputs, _suspects(args),
                           args.cam_num_epoches)
