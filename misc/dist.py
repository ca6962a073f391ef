"""Several processes through torch.distributed, launched by torchrun: ranks, shards and the collectives the
steps use. Without torchrun (no WORLD_SIZE > 1 in the environment) this is rank 0 of 1 and every function
is the identity, so one process runs exactly the code it ran before.

How the work is split (docs/running.md "Several processes (torchrun)"):
- per-image steps: every rank takes its share of the images still to do (`pending_shard`), one rank's
  outputs are the one process's outputs for those images;
- training steps: every rank builds the same data loader with the same seed, so it draws the same global
  batches and augmentations as one process; it computes on its slice of each global batch (`batch_slice`)
  and its loss is its *share* of the global batch's loss (the global loss is the sum of the shares);
  `sum_gradients` adds the ranks' gradients, so each update is the one-process update on the global batch,
  whatever the number of processes. Statistics over the batch (W-OoD's top-tau threshold, the
  anti-adversarial step's max|g| and clamp bounds, IRN's pixel counts) go through `total` / `maximum` /
  `minimum` / `gather_rows`.
The ranks must therefore consume their random generators alike: `require_same` checks it where a
divergence would otherwise pass silently.
"""
import datetime
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from misc.utils import InputError, pending

DEFAULT_TIMEOUT_MINUTES = 120
DIGEST_ELEMENTS = 1 << 16   # elements of a batch compared across ranks (evenly spaced)


def launched():
    """Whether this process was started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active():
    return dist.is_available() and dist.is_initialized()


def world():
    return dist.get_world_size() if active() else 1


def rank():
    return dist.get_rank() if active() else 0


def is_main():
    return rank() == 0


def init(device_flag, timeout_minutes=DEFAULT_TIMEOUT_MINUTES):
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU) and return this rank's device name.

    `device_flag` is --device (None: cuda if available). On CUDA each process takes the GPU of its
    LOCAL_RANK; an explicit GPU index cannot be shared by several processes. A rank waiting longer than
    `timeout_minutes` at a barrier or collective (--dist_timeout) stops the run: rank 0 alone runs the
    evaluations while the others wait, so it must exceed the longest of them.
    """
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if not launched():
        return device_flag
    device = device_flag or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda":
        if torch.device(device).index is not None:
            raise InputError(f"--device {device}: under torchrun every process takes the GPU of its local rank; "
                             f"pass --device cuda (choose the GPUs with CUDA_VISIBLE_DEVICES)")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise InputError(f"torchrun started local rank {local_rank} but this node has "
                             f"{torch.cuda.device_count()} GPU(s): lower --nproc_per_node")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=torch.device(device), timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return device


def close():
    if active():
        dist.destroy_process_group()


def barrier():
    if active():
        dist.barrier()


# ------------------------------------------------------------------------------------------- shards

def shard(items):
    """This rank's items: every world()-th one, from its rank on (all items with one process)."""
    return items[rank()::world()]


def pending_shard(ids, out_path_of):
    """(every id still to do, this rank's share of them): the same list on every rank, read after a
    barrier so that no rank has started writing; a second barrier before anyone does."""
    barrier()
    todo = pending(ids, out_path_of)
    barrier()
    return todo, shard(todo)


def per_rank(batch_size, flag):
    """The per-rank part of a global batch of `batch_size`; InputError unless it divides by world()."""
    if batch_size % world():
        raise InputError(f"{flag} {batch_size} does not divide by the {world()} processes: the global batch is "
                         f"split evenly over them; choose a batch size or a process count that divides")
    return batch_size // world()


def batch_slice(tensor):
    """This rank's equal slice (along dim 0) of a global batch."""
    n = per_rank(tensor.shape[0], "the batch")
    return tensor[rank() * n:(rank() + 1) * n]


def rows(tensor):
    """This rank's rows r, r + world(), ... of a batch of any size (evaluation passes; may be empty)."""
    return tensor[rank()::world()]


class GlobalProgress:
    """The progress bar of a sharded per-image step: with one process a plain bar over its items; with
    several, one bar on rank 0 that counts the outputs of all ranks (the files among `out_paths` that
    exist, looked up at most once a second)."""

    def __init__(self, out_paths, desc):
        self.paths, self.last, self.desc = list(out_paths), 0.0, desc
        self.bar = tqdm(total=len(self.paths), desc=desc, unit="img") if is_main() else None

    def update(self, n_done_here):
        if self.bar is None:
            return
        if world() == 1:
            self.bar.update(n_done_here)
        elif time.monotonic() - self.last >= 1.0:
            self._count()

    def _count(self):
        self.last = time.monotonic()
        self.bar.update(sum(os.path.exists(p) for p in self.paths) - self.bar.n)

    def close(self):
        if self.bar is not None:
            if world() > 1:
                self._count()
            self.bar.close()


# -------------------------------------------------------------------------------------- collectives

def _comm_device():
    """Where collectives run: this rank's GPU for NCCL, the CPU for gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _reduce(tensor, op):
    if not active():
        return tensor
    out = tensor.detach().to(_comm_device(), copy=True)
    dist.all_reduce(out, op=op)
    return out.to(tensor.device)


def total(tensor):
    """Sum over the ranks (a detached copy)."""
    return _reduce(tensor, dist.ReduceOp.SUM)


def maximum(tensor):
    return _reduce(tensor, dist.ReduceOp.MAX)


def minimum(tensor):
    return _reduce(tensor, dist.ReduceOp.MIN)


def total_array(array):
    """Sum over the ranks of a numpy array (confusion matrices)."""
    if not active():
        return array
    return total(torch.from_numpy(np.ascontiguousarray(array))).numpy()


def gather_rows(tensor):
    """The ranks' equal-sized (n, ...) tensors concatenated in rank order (detached): the global batch."""
    if not active():
        return tensor.detach()
    local = tensor.detach().to(_comm_device()).contiguous()
    parts = [torch.empty_like(local) for _ in range(world())]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(tensor.device)


def gather_shards(tensor, n_items):
    """Undo `shard`: the (n_items, ...) tensor whose rows r, r + world(), ... are rank r's rows."""
    if not active():
        return tensor.detach()
    most = -(-n_items // world())
    padded = torch.zeros((most,) + tuple(tensor.shape[1:]), dtype=tensor.dtype, device=_comm_device())
    padded[:tensor.shape[0]] = tensor.detach()
    parts = [torch.empty_like(padded) for _ in range(world())]
    dist.all_gather(parts, padded)
    out = tensor.new_empty((n_items,) + tuple(tensor.shape[1:]))
    for r, part in enumerate(parts):
        out[r::world()] = part[:len(range(r, n_items, world()))].to(tensor.device)
    return out


def sum_gradients(parameters):
    """Add the ranks' gradients (one flat all-reduce); each rank's loss was its share of the global loss."""
    if not active():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # on the GPU with NCCL, on the CPU with gloo
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def require_same(tensor, what):
    """RuntimeError unless every rank holds the same `tensor`, compared by a cheap digest (shape, sum and sum of
    squares in float64 of at most DIGEST_ELEMENTS evenly spaced elements): the split of the work assumes the
    ranks agree on `what`, and a diverged random stream changes every element of a batch."""
    if not active():
        return
    flat = tensor.detach().reshape(-1)
    t = flat[::max(1, flat.numel() // DIGEST_ELEMENTS)].double()
    digest = torch.stack([t.sum(), (t * t).sum(), torch.tensor(float(flat.numel()), dtype=torch.float64,
                                                               device=t.device)])
    if not torch.equal(maximum(digest), minimum(digest)):
        raise RuntimeError(f"the {world()} processes disagree on {what}: their random generators or inputs "
                           f"diverged (a step that drew random numbers on some ranks only); results would "
                           f"depend on the process count, so the run stops")


def main_first(fn, *args, **kwargs):
    """Call `fn` on rank 0 only (e.g. claiming an output folder), then meet at a barrier; its result on rank 0,
    None elsewhere. If it raises, rank 0 stops and torchrun ends the waiting ranks."""
    result = fn(*args, **kwargs) if is_main() else None
    barrier()
    return result
