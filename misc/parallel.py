"""Per-image work split over the calling process and spawned helper processes (CPU), one progress bar.

The calling process works too: it starts at once, while the helpers spawn and import torch (about
1 s each on the 2-core test machine, a sixth of a toy make_cam). Every process takes the next
unclaimed item from a shared counter, so all finish within one item of each other. Each process builds
its own state once (`setup`: a model, a dataset); this module keeps it, so a step needs no module-level
state of its own and the caller's copy is freed when the pool ends.

Helpers never outlive the calling process: they die with it, whatever signal ends it (SIGKILL from the
OOM killer too: Linux's parent-death signal, and a watchdog thread elsewhere). They ignore SIGINT, so a
Ctrl-C reaches the calling process only, which prints the one line and stops them after their item.
"""
import collections
import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import torch
from tqdm import tqdm

_HELPER = {}  # a helper process's shared counters and its state (set by _init_helper)
_PR_SET_PDEATHSIG = 1       # linux/prctl.h
_WATCHDOG_PERIOD_S = 1.0


def _die_with_parent(parent_pid):
    """End this process as soon as `parent_pid` (the pool's owner) is gone."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(_WATCHDOG_PERIOD_S)
        os._exit(1)

    if os.getppid() != parent_pid:  # died before the parent-death signal was set
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="parent-watchdog").start()


def _drain(work_item, state, n_items, next_item, done, after_item=None):
    """Claim item indices from the shared counter `next_item` and call `work_item(state, index)` on them
    until none is left."""
    while True:
        with next_item.get_lock():
            index = next_item.value
            next_item.value = index + 1
        if index >= n_items:
            return
        work_item(state, index)
        with done.get_lock():
            done.value += 1
        if after_item is not None:
            after_item()


def _init_helper(parent_pid, next_item, done, setup, setup_args):
    _die_with_parent(parent_pid)
    _HELPER.update(next_item=next_item, done=done, state=setup(*setup_args))


def _helper(work_item, n_items):
    _drain(work_item, _HELPER["state"], n_items, _HELPER["next_item"], _HELPER["done"])


@contextlib.contextmanager
def _sigint_ignored():
    """SIGINT ignored in this process while processes are started (a Ctrl-C then is lost, for milliseconds)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_in_processes(n_items, n_proc, setup, setup_args, work_item, desc):
    """Call `work_item(state, index)` for every index of range(n_items), in this process and
    `n_proc - 1` helpers, where `state = setup(*setup_args)` is built once per process, this one
    included; both must be module-level functions (picklable). This process's torch thread count is
    restored afterwards (setups set one thread per process)."""
    n_proc = max(1, min(n_proc, n_items))
    # spawn: a forked child of a process that already ran OpenMP/torch threads can deadlock
    context = multiprocessing.get_context("spawn")
    next_item, done = context.Value("i", 0), context.Value("i", 0)
    threads = torch.get_num_threads()
    pool = (ProcessPoolExecutor(n_proc - 1, mp_context=context, initializer=_init_helper,
                                initargs=(os.getpid(), next_item, done, setup, setup_args)) if n_proc > 1 else None)
    with _sigint_ignored():  # inherited by the helpers (started by submit): Ctrl-C is this process's to report
        helpers = [pool.submit(_helper, work_item, n_items) for _ in range(n_proc - 1)] if pool else []

    def after_item():
        bar.update(done.value - bar.n)
        for failed in (h for h in helpers if h.done() and h.exception() is not None):
            raise failed.exception()

    try:
        with tqdm(total=n_items, desc=desc, unit="img") as bar:
            _drain(work_item, setup(*setup_args), n_items, next_item, done, after_item)
            for helper in helpers:
                helper.result()
            bar.update(done.value - bar.n)
    except BaseException:
        with next_item.get_lock():  # the helpers stop after their current item
            next_item.value = n_items
        raise
    finally:
        torch.set_num_threads(threads)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _init_worker(parent_pid):
    _die_with_parent(parent_pid)
    torch.set_num_threads(1)


@contextlib.contextmanager
def helper_pool(n_workers):
    """A pool of `n_workers` spawned helper processes for `imap_in_pool` (one torch thread each; they start at
    their first job, die with this process and ignore SIGINT, as above), or None with n_workers <= 1. Leaving
    it waits for the running jobs and drops the queued ones."""
    if n_workers <= 1:
        yield None
        return
    pool = ProcessPoolExecutor(n_workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(os.getpid(),))
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def imap_in_pool(pool, fn, jobs, window):
    """Yield `fn(*job)` for each tuple of the iterable `jobs`, in order, computed in `pool` (helper_pool; `fn`
    module-level, the jobs picklable), or in this process if `pool` is None. At most `window` jobs are taken
    from `jobs` and not yet yielded: a lazy `jobs` (a network's outputs, made in this process meanwhile) keeps
    memory bounded. A helper's exception is raised here (same type and message)."""
    if pool is None:
        for job in jobs:
            yield fn(*job)
        return
    pending = collections.deque()
    try:
        for job in jobs:
            if len(pending) >= window:
                yield pending.popleft().result()
            with _sigint_ignored():  # a helper may start in submit: it inherits the ignored SIGINT
                pending.append(pool.submit(fn, *job))
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:  # after an error: the queued jobs are dropped
            future.cancel()
