"""Train the inter-pixel relation network (docs/method.md §5.2), IRN's step/train_irn.py.

Reads the IR labels of --train_list (--ir_label_out_dir, from cam_to_ir_label) and the ImageNet backbone (or,
with --pretrained none, the ID classifier's); trains the boundary and displacement branches on random crops of
--irn_crop_size with pairs within --irn_radius, then sets the mean-shift vector to the mean displacement over
--infer_list. Writes --irn_weights_name with its provenance record (kept, and the step skipped, when made by the
same inputs). A non-finite loss, gradient or weight stops the step, nothing saved.
"""

import torch
from tqdm import tqdm

from misc import dist, indexing, provenance, sampling, steptools
from misc.torchutils import make_poly_optimizer, precision_context, require_finite
from misc.utils import InputError
from net.resnet50_irn import FEATURE_STRIDE, PARAM_GROUP_LR_MULT, new_training_module
from voc12.affinity import irn_training_dataset
from voc12.dataloader import VOC12ImageDataset, load_img_name_list

EPS = 1e-5
INPUT_MULTIPLE = 16  # the network's output stride: crops must be multiples of it


def _whole(count):
    return count


def irn_losses(pos_aff_loss, neg_aff_loss, dp_fg_loss, dp_bg_loss, bg_pos, fg_pos, neg, whole_batch=_whole):
    """docs/method.md §5.2's losses from the per-pair terms of AffinityDisplacementLoss and the affinity labels.

    Returns a dict: bg_pos, fg_pos, pos, neg, dp_fg, dp_bg and total
    = (pos + neg) / 2 + (dp_fg + dp_bg) / 2 (0-d tensors). The denominators are pair counts over the batch:
    with the batch split over processes, `whole_batch` (misc.dist.total) makes them the global batch's, and
    each rank's values are then its shares, which add up to the global batch's losses.
    """
    n_bg, n_fg, n_neg = (whole_batch(torch.sum(t)) for t in (bg_pos, fg_pos, neg))
    bg_pos_aff = torch.sum(bg_pos * pos_aff_loss) / (n_bg + EPS)
    fg_pos_aff = torch.sum(fg_pos * pos_aff_loss) / (n_fg + EPS)
    pos_aff = bg_pos_aff / 2 + fg_pos_aff / 2
    neg_aff = torch.sum(neg * neg_aff_loss) / (n_neg + EPS)
    dp_fg = torch.sum(dp_fg_loss * torch.unsqueeze(fg_pos, 1)) / (2 * n_fg + EPS)
    dp_bg = torch.sum(dp_bg_loss * torch.unsqueeze(bg_pos, 1)) / (2 * n_bg + EPS)
    total = (pos_aff + neg_aff) / 2 + (dp_fg + dp_bg) / 2
    return {"bg_pos": bg_pos_aff, "fg_pos": fg_pos_aff, "pos": pos_aff, "neg": neg_aff,
            "dp_fg": dp_fg, "dp_bg": dp_bg, "total": total}


@torch.inference_mode()
def mean_displacement(model, loader, device):
    """Mean over batches of each batch's mean displacement (2,), model in eval mode (mean shift 0). Under
    torchrun each rank takes its equal slice of every batch: a batch's mean is the mean of its slices'."""
    batch_means = [torch.mean(model(pack["img"].to(device), return_loss=False)[1],
                              dim=(0, 2, 3)).cpu()
                   for pack in tqdm(loader, desc="train_irn: mean displacement", dynamic_ncols=True)]
    if not batch_means:
        raise InputError("no complete batch for the mean displacement")
    if dist.world() == 1:
        return torch.mean(torch.stack(batch_means), dim=0)
    return dist.total(torch.stack(batch_means).sum(0)) / (len(batch_means) * dist.world())


def _check_args(args):
    if args.irn_crop_size % INPUT_MULTIPLE:
        raise InputError(f"--irn_crop_size {args.irn_crop_size} must be a multiple of {INPUT_MULTIPLE} (the "
                         f"network's output stride), e.g. 512")
    grid, rf = args.irn_crop_size // FEATURE_STRIDE, indexing.radius_floor(args.irn_radius)
    if grid <= 2 * rf:
        raise InputError(f"--irn_radius {args.irn_radius} leaves no source pixel on the {grid} x {grid} label grid "
                         f"of --irn_crop_size {args.irn_crop_size}: the crop must exceed "
                         f"{2 * rf * FEATURE_STRIDE} px, or lower the radius")


def _suspects(args):
    return {"--irn_learning_rate": args.irn_learning_rate, "--irn_weight_decay": args.irn_weight_decay}


def provenance_inputs(args):
    """What decides train_irn's weights (misc/provenance.py)."""
    no_imagenet = str(args.pretrained).lower() == "none"  # then the backbone is the ID classifier's
    return {"backbone": provenance.file_digest(args.cam_weights_name if no_imagenet else args.pretrained),
            "ir_labels": provenance.folder_identity(args.ir_label_out_dir),
            "train_list": provenance.list_digest(load_img_name_list(args.voc12_root, args.train_list)),
            "infer_list": provenance.list_digest(load_img_name_list(args.voc12_root, args.infer_list)),
            **provenance.flag_values(args, ["backbone_width", "irn_crop_size", "irn_batch_size", "irn_num_epoches",
                                            "irn_learning_rate", "irn_weight_decay", "irn_radius", "real_momentum",
                                            "seed"]),
            **provenance.non_default_flags(args, {"train_amp": "none"}),
            # "backbone" above is the weights' digest: the --backbone flag is recorded as "backbone_arch"
            **{"backbone_arch": arch for arch in provenance.non_default_flags(args, {"backbone": "resnet50"}).values()}}


def run(args):
    inputs = provenance_inputs(args)
    if steptools.keep_existing(args.irn_weights_name, "train_irn", inputs, args, "--irn_weights_name"):
        return
    _check_args(args)
    dist.per_rank(args.irn_batch_size, "--irn_batch_size")
    device = torch.device(args.device)
    grid = args.irn_crop_size // FEATURE_STRIDE
    path_index = indexing.PathIndex(radius=args.irn_radius, default_size=(grid, grid))

    steptools.require_files(args.ir_label_out_dir, load_img_name_list(args.voc12_root, args.train_list), ".png",
                            "IR labels of --train_list", "cam_to_ir_label writes labels for its --infer_list, "
                            f"which must cover --train_list: run it with --infer_list {args.train_list}")
    train_dataset = irn_training_dataset(args.train_list, args.ir_label_out_dir, args.irn_crop_size,
                                         args.voc12_root, path_index)
    if len(train_dataset) < args.irn_batch_size:
        raise InputError(f"--train_list has {len(train_dataset)} images, fewer than one batch "
                         f"(--irn_batch_size {args.irn_batch_size}); lower the batch size")
    infer_dataset = VOC12ImageDataset(args.infer_list, voc12_root=args.voc12_root,
                                      crop_size=args.irn_crop_size, crop_method="top_left")
    if len(infer_dataset) < args.irn_batch_size:
        raise InputError(f"--infer_list has {len(infer_dataset)} images, fewer than one batch "
                         f"(--irn_batch_size {args.irn_batch_size}) for the mean displacement; lower the "
                         f"batch size")
    # each rank reads only its slice of every global batch (misc/sampling.py)
    train_loader = sampling.training_loader(train_dataset, args.irn_batch_size, args.seed, "train_irn",
                                            args.num_workers, device)
    max_step = (len(train_dataset) // args.irn_batch_size) * args.irn_num_epoches

    model = new_training_module(path_index, args.backbone, args.backbone_width, args.pretrained,
                                args.cam_weights_name)
    edge_params, dp_params = model.trainable_parameters()
    optimizer = make_poly_optimizer([(edge_params, PARAM_GROUP_LR_MULT[0]), (dp_params, PARAM_GROUP_LR_MULT[1])],
                                    lr=args.irn_learning_rate, weight_decay=args.irn_weight_decay,
                                    max_step=max_step, real_momentum=args.real_momentum)
    model = model.to(device)
    model.train()

    for epoch in range(args.irn_num_epoches):
        progress = tqdm(train_loader, desc=f"train_irn: epoch {epoch + 1}/{args.irn_num_epoches}",
                        dynamic_ncols=True)
        sums, count = {}, 0
        for pack in progress:
            sampling.require_same_batch(train_loader, f"batch {count + 1} of epoch {epoch + 1}")
            local = {k: v.to(device) for k, v in pack.items() if torch.is_tensor(v)}
            with precision_context(device, args.train_amp):
                terms = model(local["img"], return_loss=True)
            # this rank's shares of the global batch's losses (global pair counts); the gradients add up
            losses = irn_losses(*(t.float() for t in terms), local["aff_bg_pos_label"], local["aff_fg_pos_label"],
                                local["aff_neg_label"], whole_batch=dist.total)
            optimizer.zero_grad()
            losses["total"].backward()
            dist.sum_gradients(model.parameters())
            losses = {k: dist.total(v.detach()) for k, v in losses.items()}
            count += 1
            require_finite("train_irn", epoch + 1, count, _suspects(args), losses["total"], model.parameters())
            optimizer.step()
            for k in ("pos", "neg", "dp_fg", "dp_bg"):
                sums[k] = sums.get(k, 0.0) + losses[k].item()
            progress.set_postfix({k: f"{v / count:.4f}" for k, v in sums.items()})
        progress.close()
        print(f"train_irn: epoch {epoch + 1} step {optimizer.global_step}/{max_step} "
              + " ".join(f"{k}={v / max(count, 1):.4f}" for k, v in sums.items()))
        steptools.check_epoch("train_irn", epoch + 1, _suspects(args), model)

    infer_loader = sampling.rank_slices_loader(infer_dataset, args.irn_batch_size, args.num_workers, device)
    model.eval()
    # clone: a normal tensor, not an inference-mode one
    model.mean_shift.running_mean = mean_displacement(model, infer_loader, device).clone().to(device)
    print(f"train_irn: mean displacement {model.mean_shift.running_mean.tolist()}")
    steptools.save_trained(args.irn_weights_name, model.state_dict(), "train_irn", inputs, _suspects(args),
                           args.irn_num_epoches)
