"""Shared pytest fixtures. The fake VOC builder lives in tests/fakevoc.py (importable by any test)."""
import pytest
import torch

from fakevoc import make_fake_voc

# One intra-op thread: the test machine's 2 cores are shared, and OpenMP threads spinning against other
# processes made a width-8 net test 25x slower (33 s vs 1.4 s measured on tests/test_cam_net.py).
torch.set_num_threads(1)


@pytest.fixture
def fake_voc(tmp_path):
    """A tiny VOC folder (4 train, 2 val, 2 Aug-only ids, 64 px, 3 classes): the dict of make_fake_voc."""
    return make_fake_voc(tmp_path / "VOC2012", n_train=4, n_val=2, size=64, seed=0)
