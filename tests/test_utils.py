"""misc.utils: atomic writes leave no partial file, npz round trip without pickle, clear load errors."""
import os

import numpy as np
import pytest
import torch

from misc.utils import InputError, atomic_path, load_npz, load_torch, palette_voc, pending, save_npz, save_torch


def test_atomic_path_keeps_nothing_on_failure(tmp_path):
    target = tmp_path / "out.npz"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(str(target)) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_npz_round_trip_and_refuses_objects(tmp_path):
    path = str(tmp_path / "a.npz")
    save_npz(path, keys=np.array([3, 7]), cam=np.ones((2, 4, 5), np.float32))
    data = load_npz(path)
    assert data["keys"].tolist() == [3, 7] and data["cam"].shape == (2, 4, 5)
    assert sorted(os.listdir(tmp_path)) == ["a.npz"]
    with open(tmp_path / "obj.npz", "wb") as f:
        np.savez(f, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError, match="obj.npz"):
        load_npz(str(tmp_path / "obj.npz"))


def test_truncated_files_give_clear_errors(tmp_path):
    path = str(tmp_path / "a.npz")
    save_npz(path, cam=np.zeros((50, 50), np.float32))
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(InputError, match="a.npz"):
        load_npz(path)
    wpath = str(tmp_path / "w.pth")
    save_torch(wpath, {"w": torch.ones(3)})
    assert torch.equal(load_torch(wpath)["w"], torch.ones(3))
    with open(wpath, "r+b") as f:
        f.truncate(20)
    with pytest.raises(InputError, match="w.pth"):
        load_torch(wpath)
    with pytest.raises(InputError, match="missing file"):
        load_torch(str(tmp_path / "nope.pth"))


def test_pending_and_palette(tmp_path):
    (tmp_path / "b.npz").write_bytes(b"")
    assert pending(["a", "b", "c"], lambda i: str(tmp_path / f"{i}.npz")) == ["a", "c"]
    pal = palette_voc()
    assert pal.shape == (256, 3)
    assert pal[1].tolist() == [128, 0, 0] and pal[15].tolist() == [192, 128, 128]
    assert pal[255].tolist() == [224, 224, 192]
