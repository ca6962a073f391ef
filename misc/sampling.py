"""Training batches that depend only on (seed, stream, epoch, image index), so that each torchrun rank reads only
its own slice of every global batch and the result does not depend on the number of processes.

- The order: epoch e of a stream is the permutation `default_rng([seed, stream, e])` of the dataset; global batch
  b is positions [b*B, (b+1)*B) of it (the last incomplete batch dropped). Rank r of N reads rows
  [r*B/N, (r+1)*B/N) of each global batch (misc.dist.batch_slice's rows), so the ranks' slices in rank order
  are the one-process batch.
- The augmentation: every item is drawn with numpy's global generator seeded from (seed, stream, epoch, index)
  (misc/imutils.py draws from it) and restored afterwards, so an image's crop, flip and scale in an epoch are
  the same whichever process, worker or batch position reads it.

`training_loader` builds such a DataLoader; `rank_rows_loader` one over fixed batches (validation), each rank
reading only its rows.
"""
import zlib

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from misc import dist


def _pin_memory(device):
    return torch.device(device).type == "cuda"


def stream_id(name):
    """A stable integer for a stream's name (e.g. "train_cam"), so that two loaders never share draws."""
    return zlib.crc32(name.encode())


def item_seed(seed, stream, epoch, index):
    """The 32-bit seed of numpy's generator for one item."""
    return int(np.random.SeedSequence([seed, stream, epoch, index]).generate_state(1)[0])


def epoch_order(n_items, seed, stream, epoch):
    """The permutation of range(n_items) that epoch `epoch` of the stream visits."""
    return np.random.default_rng([seed, stream, epoch]).permutation(n_items)


def global_batches(n_items, batch_size, seed, stream, epoch, shuffle=True):
    """The global batches of one epoch: lists of `batch_size` dataset indices (an incomplete last one dropped)."""
    order = epoch_order(n_items, seed, stream, epoch) if shuffle else np.arange(n_items)
    return [order[b * batch_size:(b + 1) * batch_size].tolist() for b in range(n_items // batch_size)]


class SeededItems(Dataset):
    """`dataset[index]` drawn with numpy's generator seeded by (seed, stream, epoch, index); items are keyed by
    (epoch, index). The caller's generator state is restored afterwards."""

    def __init__(self, dataset, seed, stream):
        self.dataset, self.seed, self.stream = dataset, seed, stream

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        state = np.random.get_state()
        np.random.seed(item_seed(self.seed, self.stream, epoch, index))
        try:
            return self.dataset[index]
        finally:
            np.random.set_state(state)


class RankBatches:
    """Batch sampler: this rank's slice of each global batch of the stream, as (epoch, index) keys. Every pass
    (`iter`) is the next epoch; `global_batch` is the last global batch handed out (for cross-rank checks)."""

    def __init__(self, n_items, batch_size, seed, stream, shuffle=True):
        self.n_items, self.batch_size, self.seed, self.stream, self.shuffle = n_items, batch_size, seed, stream, shuffle
        self.per_rank = dist.per_rank(batch_size, "the batch size")
        self.epoch = 0
        self.global_batch = None

    def __len__(self):
        return self.n_items // self.batch_size

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        first = dist.rank() * self.per_rank
        for batch in global_batches(self.n_items, self.batch_size, self.seed, self.stream, epoch, self.shuffle):
            self.global_batch = batch
            yield [(epoch, index) for index in batch[first:first + self.per_rank]]


def training_loader(dataset, batch_size, seed, stream, num_workers, device, collate_fn=None):
    """This rank's shuffled training batches of `dataset` (global batch `batch_size`, which must divide by the
    number of processes); each pass over it is the next epoch. The loader's `batch_sampler.global_batch` names
    the global batch last read."""
    sampler = RankBatches(len(dataset), batch_size, seed, stream_id(stream))
    kwargs = {"collate_fn": collate_fn} if collate_fn is not None else {}
    return DataLoader(SeededItems(dataset, seed, sampler.stream), batch_sampler=sampler, num_workers=num_workers,
                      pin_memory=_pin_memory(device), **kwargs)


def require_same_batch(loader, what):
    """RuntimeError unless every rank is at the same global batch of `loader` (a `training_loader`)."""
    dist.require_same(torch.tensor(loader.batch_sampler.global_batch, dtype=torch.float64), what)


def rank_rows(n_items, batch_size, drop_last=False):
    """For fixed consecutive batches of `batch_size` (in order), this rank's rows of each: rank r of N takes rows
    r, r + N, ... of every batch (misc.dist.rows); a batch may leave a rank none."""
    ends = range(batch_size, n_items + (0 if drop_last else batch_size), batch_size)
    for end in ends:
        start, end = end - batch_size, min(end, n_items)
        yield list(range(start + dist.rank(), end, dist.world()))


def rank_slices(n_items, batch_size):
    """For fixed consecutive batches of `batch_size` (an incomplete last one dropped), this rank's slice of each
    (misc.dist.batch_slice's rows)."""
    per_rank = dist.per_rank(batch_size, "the batch size")
    for start in range(0, n_items - batch_size + 1, batch_size):
        first = start + dist.rank() * per_rank
        yield list(range(first, first + per_rank))


def rank_slices_loader(dataset, batch_size, num_workers, device):
    """This rank's slice of every fixed (unshuffled, whole) batch of `dataset`."""
    return DataLoader(dataset, batch_sampler=list(rank_slices(len(dataset), batch_size)), num_workers=num_workers,
                      pin_memory=_pin_memory(device))


def rank_rows_loader(dataset, batch_size, num_workers, device):
    """The rows of every (unshuffled) batch of `dataset` that this rank scores (validation passes)."""
    batches = [rows for rows in rank_rows(len(dataset), batch_size) if rows]
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                      pin_memory=_pin_memory(device))
