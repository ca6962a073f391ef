"""misc/sampling.py: each rank reads only its slice of every global batch, and the batches and augmentations
depend only on (seed, stream, epoch, index), so N processes see the one-process batches."""
import numpy as np
import pytest
import torch

from fakevoc import make_fake_voc
from misc import dist, imutils, sampling
from voc12.dataloader import VOC12ClassificationDataset


class Draws(torch.utils.data.Dataset):
    """Item i: (i, a draw of numpy's global generator), as the augmentations draw."""

    def __len__(self):
        return 10

    def __getitem__(self, index):
        return torch.tensor([float(index), np.random.random()], dtype=torch.float64)


def as_rank(monkeypatch, rank, world):
    monkeypatch.setattr(dist, "rank", lambda: rank)
    monkeypatch.setattr(dist, "world", lambda: world)


def epochs_of(loader, n_epochs):
    return [torch.cat(list(loader)) for _ in range(n_epochs)]


def test_the_ranks_slices_in_rank_order_are_the_one_process_batches(monkeypatch):
    one = epochs_of(sampling.training_loader(Draws(), 4, 7, "s", 0, "cpu"), 3)
    slices = []
    for rank in range(2):
        as_rank(monkeypatch, rank, 2)
        slices.append([list(loader_batch) for loader_batch in
                       [list(sampling.training_loader(Draws(), 4, 7, "s", 0, "cpu")) for _ in range(1)][0]])
    as_rank(monkeypatch, 0, 1)
    # epoch 0: 2 global batches of 4 (10 items, the last 2 dropped); each rank's batch is 2 rows
    for b in range(2):
        both = torch.cat([torch.stack(slices[0][b]), torch.stack(slices[1][b])])
        assert torch.equal(both, one[0][4 * b:4 * b + 4])
    assert one[0].shape == (8, 2) and len(set(one[0][:, 0].tolist())) == 8
    # every epoch is another order and other draws; the same (epoch, index) always draws the same
    assert not torch.equal(one[0], one[1])
    again = epochs_of(sampling.training_loader(Draws(), 4, 7, "s", 0, "cpu"), 3)
    assert all(torch.equal(a, b) for a, b in zip(one, again))
    other_seed = epochs_of(sampling.training_loader(Draws(), 4, 8, "s", 0, "cpu"), 1)
    assert not torch.equal(other_seed[0], one[0])


def test_loader_workers_and_the_callers_generator_do_not_change_the_draws():
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    serial = epochs_of(sampling.training_loader(Draws(), 2, 0, "s", 0, "cpu"), 2)
    assert np.array_equal(np.random.get_state()[1], before)  # restored
    workers = epochs_of(sampling.training_loader(Draws(), 2, 0, "s", 2, "cpu"), 2)
    assert all(torch.equal(a, b) for a, b in zip(serial, workers))


def test_a_rank_never_opens_an_image_of_another_ranks_slice(tmp_path, monkeypatch):
    voc = make_fake_voc(tmp_path / "VOC2012", n_train=8, n_val=1, size=48, seed=0, n_aug_only=0)
    dataset = VOC12ClassificationDataset.for_training("train", voc["root"], resize_long=(32, 48), crop_size=32)
    opened = []
    real_read = imutils.read_rgb
    monkeypatch.setattr(imutils, "read_rgb", lambda path: opened.append(path) or real_read(path))
    expected = {}
    for rank in range(2):
        as_rank(monkeypatch, rank, 2)
        opened.clear()
        loader = sampling.training_loader(dataset, 4, 0, "train_cam", 0, "cpu")
        names = [name for batch in loader for name in batch["name"]]
        order = sampling.global_batches(len(dataset), 4, 0, sampling.stream_id("train_cam"), 0)
        expected[rank] = [dataset.img_name_list[i] for batch in order for i in batch[2 * rank:2 * rank + 2]]
        assert names == expected[rank]
        assert [p.rsplit("/", 1)[-1][:-4] for p in opened] == expected[rank]  # only its own images were read
    assert not set(expected[0]) & set(expected[1]) and len(expected[0]) == len(expected[1]) == 4


def test_fixed_batches_rows_and_slices(monkeypatch):
    as_rank(monkeypatch, 1, 3)
    assert list(sampling.rank_rows(7, 4)) == [[1], [5]]
    assert list(sampling.rank_slices(13, 6)) == [[2, 3], [8, 9]]
    with pytest.raises(Exception, match="does not divide by the 3 processes"):
        sampling.RankBatches(10, 4, 0, 0)
