"""The plumbing every step shares, as plain functions: keep or refuse existing outputs, require inputs, claim an
output folder and share its pending images over torchrun's ranks, run per image (in CPU processes or on one
device) with a progress bar, and the training step with its finite checks.

A per-image step is then its maths plus a few calls (docs/extending.md, "Add a per-image step"):

    inputs = {"cams": provenance.folder_identity(cam_dir), **provenance.flag_values(args, [...])}
    todo, mine = steptools.claim_outputs(out_dir, "my_step", inputs, ".png", args, "--my_out_dir", ids)
    steptools.run_per_image(mine, setup, (args.voc12_root, ...), write, steptools.progress(out_dir, todo, ".png",
                            "my_step"), n_processes=steptools.cpu_processes(args))

and gets resume (outputs made by the same inputs are kept), provenance, torchrun sharding, one progress bar and
one-line errors. `setup(*setup_args, ids)` builds a process's state once (a net, a dataset: it must be a
module-level function, the CPU pool pickles it) and `write(state, items)` writes the outputs of a group of
dataset items. A loader whose items may raise an InputError in a DataLoader worker goes through
`checked_batches` (or `ErrorsAsValues` + `collate_errors` + `raise_input_errors`) to keep that error one line.
"""
import os

import torch
from torch.utils.data import DataLoader, Dataset

from misc import dist, provenance
from misc.batching import same_size_groups
from misc.parallel import run_in_processes
from misc.torchutils import TrainingDiverged, precision_context, require_finite
from misc.utils import InputError, pending, require_dir

MAX_LISTED = 5  # missing inputs named in one error line


# ------------------------------------------------------------------------------------------- outputs

def keep_existing(path, step, inputs, args, flag):
    """Whether the output file `path` (weights, a list) is kept and `step` skipped: it exists and was made by
    `inputs`, or has no provenance record (a released file, used as given); says which. A file made by other
    inputs stops the step (InputError) unless --overwrite (misc/provenance.py `file_up_to_date`)."""
    kept = provenance.file_up_to_date(path, step, inputs, args, flag)
    if kept:
        print(f"{step}: {path} exists; keeping it ({kept})")
    return bool(kept)


def output_path(folder, img_id, suffix):
    return os.path.join(folder, img_id + suffix)


def claim_outputs(folder, step, inputs, suffix, args, flag, ids):
    """Claim `folder` for the `*<suffix>` outputs of `step` made by `inputs` (rank 0 first: stale outputs stop
    the step, or are deleted with --overwrite), then (the ids still to do, this rank's share of them)."""
    dist.main_first(provenance.claim_folder, folder, step, inputs, suffix, args, flag)
    return dist.pending_shard(ids, lambda img_id: output_path(folder, img_id, suffix))


def progress(folder, todo, suffix, desc):
    """One progress bar over the images still to do (rank 0 counts the files of all ranks)."""
    return dist.GlobalProgress([output_path(folder, img_id, suffix) for img_id in todo], desc)


def run_pending(step, ids, folder, suffix, inputs, args, flag, setup, setup_args, write, about="", **options):
    """The whole of a per-image step after its inputs are known: claim `folder` (`claim_outputs`), say how many
    images are left (and `about`: what the step uses), and write the outputs of this rank's share of them
    (`run_per_image` with `options`)."""
    todo, mine = claim_outputs(folder, step, inputs, suffix, args, flag, ids)
    print(f"{step}: {len(ids) - len(todo)} already in {folder}, {len(todo)} to do (of {len(ids)} images)"
          f"{about}, {dist.world()} process(es)")
    run_per_image(mine, setup, setup_args, write, progress(folder, todo, suffix, step), **options)


# -------------------------------------------------------------------------------------------- inputs

def classifier_weights(args, flag):
    """(weights file, how to make it) of the classifier a CAM step reads, chosen by its `flag` (e.g.
    --make_cam_from): id (train_cam's) or wood (train_wood's)."""
    if getattr(args, flag.lstrip("-")) == "id":
        return args.cam_weights_name, "run train_cam (--train_cam_pass true) first"
    return args.wood_weights_name, f"run train_wood (--train_wood_pass true) first, or use {flag} id"


def cam_inputs(args, kind, weights, hint, flags=()):
    """What decides the CAM files of the `kind` classifier (id / wood) in `weights` (make_cam, make_advcam;
    misc/provenance.py); `flags` are the method's further flags (AdvCAM's)."""
    return {"classifier": kind, "weights": provenance.input_file(weights, f"the classifier weights (.pth); {hint}"),
            **provenance.flag_values(args, ["cam_scales", "backbone_width", "amp", *flags]),
            **provenance.non_default_flags(args, {"backbone": "resnet50"})}


def require_files(folder, ids, suffix, what, fix):
    """InputError unless `<folder>/<id><suffix>` exists for every id: `what` names the files (e.g. "CAM files of
    --infer_list"), `fix` says how to make them (e.g. "run make_cam on the same --infer_list first")."""
    require_dir(folder, f"the {what} (<id>{suffix}): {fix}")
    missing = pending(ids, lambda img_id: output_path(folder, img_id, suffix))
    if missing:
        shown = ", ".join(m + suffix for m in missing[:MAX_LISTED]) + (" ..." if len(missing) > MAX_LISTED else "")
        raise InputError(f"{len(missing)} of the {len(ids)} {what} missing from {folder} ({shown}): {fix}")


# ------------------------------------------------------------------------------------------ per image

def cpu_processes(args):
    """How many CPU processes share a step's images in one run: --num_workers on a CPU without torchrun (one
    torch thread each), else 1 (under torchrun the ranks are the processes; a GPU is fed by one process)."""
    if dist.world() > 1 or torch.device(args.device).type != "cpu":
        return 1
    return max(1, args.num_workers)


def loader_workers(args):
    """Data-loader workers of a one-process per-image run: --num_workers on a GPU; none on a CPU, where they
    would compete with the computation for the same cores."""
    return 0 if torch.device(args.device).type == "cpu" else args.num_workers


def _write_one(state, index):
    state["write"](state, [state["dataset"][index]])


def _pool_state(setup, setup_args, write, ids):
    torch.set_num_threads(1)
    return {**setup(*setup_args, ids), "write": write}


def run_per_image(ids, setup, setup_args, write, bar, n_processes=1, num_workers=0, group_size=1, size_of=None):
    """Write the outputs of `ids`: `state = setup(*setup_args, ids)` (a dict with at least "dataset", whose item
    i is image ids[i]) and `write(state, items)` for groups of items.

    With `n_processes` > 1 the images are shared by that many CPU processes (this one included, one image at a
    time, misc/parallel.py); else this process reads them through a DataLoader of `num_workers` workers and, with
    `group_size` > 1, writes groups of up to that many images of one `size_of(item)` (misc/batching.py)."""
    if not ids:
        bar.close()
        return
    if n_processes > 1 and len(ids) > 1:
        bar.close()  # the pool shows its own bar
        run_in_processes(len(ids), n_processes, _pool_state, (setup, setup_args, write, ids), _write_one,
                         bar.desc)
        return
    state = setup(*setup_args, ids)
    # batch_size=None: one image per item, as the dataset gives it
    loader = DataLoader(state["dataset"], batch_size=None, shuffle=False, num_workers=num_workers,
                        pin_memory=num_workers > 0 and torch.cuda.is_available())
    groups = same_size_groups(loader, size_of, group_size) if group_size > 1 else ([item] for item in loader)
    for items in groups:
        write(state, items)
        bar.update(len(items))
    bar.close()


class IdDataset(torch.utils.data.Dataset):
    """The ids themselves as a dataset, for steps whose `write` reads its own inputs."""

    def __init__(self, ids):
        self.ids = list(ids)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return self.ids[index]


# ------------------------------------------------------------------------------------------- loaders

class ErrorsAsValues(Dataset):
    """Return an item's InputError as a value, so the main process raises it with its own message
    (an exception raised inside a DataLoader worker comes back wrapped in the worker's traceback)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, idx):
        try:
            return self.dataset[idx]
        except InputError as e:
            return {"input_error": str(e)}


def collate_errors(batch):
    """DataLoader collate of `ErrorsAsValues` items: the first InputError of the batch, else the default."""
    for item in batch:
        if "input_error" in item:
            return {"input_error": item["input_error"]}
    return torch.utils.data.default_collate(batch)


def checked_batches(dataset, **loader_kwargs):
    """Iterate a DataLoader over `dataset`; an InputError of any item (unreadable image...) is raised
    in the calling process with its own message. `loader_kwargs` go to DataLoader."""
    return raise_input_errors(DataLoader(ErrorsAsValues(dataset), collate_fn=collate_errors, **loader_kwargs))


def raise_input_errors(batches):
    """The batches of a loader over `ErrorsAsValues(...)` with `collate_errors`, raising an item's InputError."""
    for batch in batches:
        if "input_error" in batch:
            raise InputError(batch["input_error"])
        yield batch


# ------------------------------------------------------------------------------------------- training

def training_step(model, optimizer, pack, device, loss_of, amp="none"):
    """One update's gradients on a global batch of which `pack` (dict of batch tensors) is this rank's slice
    (misc/sampling.py): its share of the loss (`loss_of(model, slice) / world`, under `amp` autocast), gradients
    summed over the ranks. Returns the global loss (tensor) for the caller's finite check and logging; the caller
    steps the optimizer."""
    local = {k: v.to(device, non_blocking=True) for k, v in pack.items() if torch.is_tensor(v)}
    with precision_context(device, amp):
        share = loss_of(model, local) / dist.world()
    optimizer.zero_grad()
    share.backward()
    dist.sum_gradients(model.parameters())
    return dist.total(share.detach())


def validation_loss(model, loader, device, loss_fn):
    """Mean per-image `loss_fn(logits, labels)` over a validation set, in eval mode (train mode restored after).
    `loader` gives this rank's rows of each batch (misc.sampling.rank_rows_loader); the ranks' sums are added."""
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    with torch.inference_mode():
        for pack in loader:
            logits = model(pack["img"].to(device))
            total += loss_fn(logits, pack["label"].to(device)).double().cpu() * pack["label"].size(0)
            count += pack["label"].size(0)
    model.train()
    return float(dist.total(total)) / max(float(dist.total(count)), 1.0)


def check_epoch(step, epoch, suspects, model, val_loss=None):
    """After an epoch: stop the step (TrainingDiverged, nothing saved) if the validation loss or any weight or
    buffer (BatchNorm statistics included) is not finite: a net that scores NaN is no result."""
    if val_loss is not None and not torch.isfinite(torch.tensor(val_loss)):
        raise TrainingDiverged(f"{step} diverged: the validation loss is {val_loss} after epoch {epoch}; nothing "
                               f"was saved. Lower {_listed(suspects)} (or check the images of the lists) and run "
                               f"the step again")
    require_finite(step, epoch, None, suspects, state_dict=model.state_dict())


def _listed(suspects):
    return ", ".join(f"{flag} {value:g}" for flag, value in suspects.items())


def save_trained(path, state_dict, step, inputs, suspects, epoch):
    """Save trained weights (as CPU tensors, with their provenance record; rank 0) after checking they are all
    finite (else TrainingDiverged and nothing is saved)."""
    require_finite(step, epoch, None, suspects, state_dict=state_dict)
    if dist.is_main():
        provenance.save_weights(path, {k: v.detach().cpu() for k, v in state_dict.items()}, step, inputs)
    print(f"{step}: saved {path}")
