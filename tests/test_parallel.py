import os
import time

import pytest
import torch

from misc.parallel import run_in_processes


def _setup(out_dir, fail_at):
    torch.set_num_threads(1)
    return dict(out_dir=out_dir, fail_at=fail_at)


def _work(state, index):
    if index == state["fail_at"]:
        raise ValueError(f"item {index} is bad")
    time.sleep(0.05)
    path = os.path.join(state["out_dir"], f"{index}.txt")
    with open(path, "x") as f:  # "x": a second call for the same item would fail
        f.write(str(os.getpid()))


def test_every_item_once_and_the_caller_works_too(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_in_processes(24, 2, _setup, (str(tmp_path), None), _work, "test")
        assert torch.get_num_threads() == 2  # the setup's one thread is undone in the caller
    finally:
        torch.set_num_threads(threads)
    assert sorted(os.listdir(tmp_path)) == sorted(f"{i}.txt" for i in range(24))
    writers = {open(tmp_path / f"{i}.txt").read() for i in range(24)}
    assert str(os.getpid()) in writers  # the caller started at once, before its helper was up
    assert len(writers) <= 2


def test_an_error_in_any_process_reaches_the_caller(tmp_path):
    with pytest.raises(ValueError, match="item 30 is bad"):
        run_in_processes(40, 2, _setup, (str(tmp_path), 30), _work, "test")
    assert len(os.listdir(tmp_path)) < 40
