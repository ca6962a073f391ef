"""Per-image work split over spawned worker processes (CPU), with one progress bar."""
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed

from tqdm import tqdm

CHUNKS_PER_PROCESS = 8  # small chunks keep the progress bar moving and the processes balanced


def run_in_processes(n_items, n_proc, initializer, initargs, work_chunk, desc):
    """Call `work_chunk(list of item indices)` (returns how many it did) over `n_proc` processes, each
    set up once by `initializer(*initargs)`; both must be module-level functions (picklable)."""
    n_proc = min(n_proc, n_items)
    chunk = max(1, math.ceil(n_items / (n_proc * CHUNKS_PER_PROCESS)))
    chunks = [list(range(i, min(i + chunk, n_items))) for i in range(0, n_items, chunk)]
    # spawn: a forked child of a process that already ran OpenMP/torch threads can deadlock
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(n_proc, mp_context=context, initializer=initializer,
                             initargs=initargs) as pool, tqdm(total=n_items, desc=desc, unit="img") as bar:
        futures = [pool.submit(work_chunk, c) for c in chunks]
        try:
            for future in as_completed(futures):
                bar.update(future.result())
        except BaseException:
            for f in futures:
                f.cancel()
            raise
