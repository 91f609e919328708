"""The build's worker processes: a pool whose workers die with the build, and a progress bar of tiles done.

`_run_jobs(task, jobs, num_proc)` runs `task` (the build's `_write_job`) over the jobs, in this
process or in a pool of forked workers; each worker arms the kernel's parent-death signal (or a
watching thread) so that a killed build leaves no worker behind, and tunes glibc's allocator
(`tune_allocator`). The task adds the tiles it finishes to a shared counter (`_count_done`)
that `_ProgressBar` follows. A worker that dies (the OOM killer) stops the build with `ChildProcessError`: a pool
left alone would start another worker and wait forever for the dead one's jobs.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import threading
import time
from typing import Callable


def tune_allocator() -> bool:
    """Let glibc's malloc keep freed blocks of up to 16 MB for reuse in this process.

    By default every array over ~128 kB (a tile band stack is 230 kB) is a fresh `mmap` whose pages
    the kernel faults in and zeroes, and freed memory at the top of the heap goes back to the
    system: ~250 page faults per tile, ~20 % of a build's CPU time. Called in the build's worker
    processes and by the CLI, not by `build_dataset` in a caller's process. False where it does
    not apply (no glibc).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 16 << 20)) and bool(mallopt(m_trim_threshold, 64 << 20))


_tiles_done = None
"""This process's handle on the build's shared count of tiles done (read for the progress bar)."""


def _count_done(tiles: int) -> None:
    if _tiles_done is not None:
        with _tiles_done.get_lock():
            _tiles_done.value += tiles


def _init_worker(tiles_done, parent_pid: int) -> None:
    global _tiles_done
    _tiles_done = tiles_done
    # Ctrl-C reaches the whole process group: the build stops the pool and says so in one line; a worker
    # would print a traceback of its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent_pid)
    tune_allocator()


PR_SET_PDEATHSIG = 1
"""`prctl` option (linux/prctl.h): a signal the kernel sends this process when its parent dies."""


def _die_with_parent(parent_pid: int, interval: float = 0.5) -> None:
    """Make this worker exit when the build process dies, even by SIGKILL (which no handler sees): a worker left
    behind would go on reading tiles into a scratch folder that nobody will use. Linux: the kernel's parent-death
    signal; elsewhere, a thread that watches for the parent's exit."""
    try:
        armed = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        armed = False
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent_pid, interval), daemon=True,
                         name="stage2-build-parent-watch").start()


def _watch_parent(parent_pid: int, interval: float) -> None:
    while os.getppid() == parent_pid:  # an orphan is re-parented (to init or a subreaper)
        time.sleep(interval)
    os._exit(1)


def _run_jobs(task: Callable[[dict], dict], jobs: list[dict], num_proc: int) -> list[dict]:
    """Results of `task` (the build's `_write_job`, a module-level function: the pool sends it to the workers
    by its module path) in job order; worker processes take jobs as they free up. A progress bar (`datasets`'
    tqdm: `datasets.disable_progress_bars()` turns it off) counts the tiles done (a job is a dict whose
    `"chunks"` each hold a list of `"tiles"`)."""
    global _tiles_done
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    tiles_done = context.Value("q", 0)
    total = sum(len(chunk["tiles"]) for job in jobs for chunk in job["chunks"])
    if num_proc <= 1 or len(jobs) <= 1:
        _tiles_done = tiles_done
        try:
            with _ProgressBar(tiles_done, total):
                return [task(job) for job in jobs]
        finally:
            _tiles_done = None
    # the workers are forked before the progress thread starts
    others = set(multiprocessing.active_children())
    with context.Pool(min(num_proc, len(jobs)), initializer=_init_worker,
                      initargs=(tiles_done, os.getpid())) as pool:
        workers = [child for child in multiprocessing.active_children() if child not in others]
        with _ProgressBar(tiles_done, total):
            # imap: results (and the first error, e.g. a strict-mode TileError) in job order
            results, pending = [], pool.imap(task, jobs)
            while len(results) < len(jobs):
                try:
                    results.append(pending.next(timeout=_WORKER_CHECK_INTERVAL))
                except multiprocessing.TimeoutError:
                    _check_workers(workers)
            return results


_WORKER_CHECK_INTERVAL = 1.0
"""Seconds between checks that no worker has died while the build waits for a result."""


def _check_workers(workers: list) -> None:
    """ChildProcessError (an OSError: the system failed, not the input) when a worker has died: the pool would start
    another one and wait forever for the jobs the dead one held (a worker the kernel's OOM killer ended)."""
    for worker in workers:
        if worker.exitcode is not None:
            code = worker.exitcode
            how = f"killed by {_signal_name(-code)}" if code < 0 else f"exit status {code}"
            hint = "; out of memory? try a smaller --num_proc" if code == -signal.SIGKILL else ""
            raise ChildProcessError(f"a build worker process (pid {worker.pid}) died ({how}{hint}); nothing was "
                                    "written")


class _ProgressBar:
    """A tqdm bar that follows a shared counter from a background thread while the block runs."""

    def __init__(self, counter, total: int, interval: float = 0.5):
        self.counter, self.total, self.interval = counter, total, interval
        self._stop = threading.Event()

    def __enter__(self):
        from datasets.utils import tqdm

        self.bar = tqdm(total=self.total, unit=" tiles", desc="Building the dataset")
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()
        return self

    def _follow(self) -> None:
        while not self._stop.wait(self.interval):
            self._update()

    def _update(self) -> None:
        self.bar.update(self.counter.value - self.bar.n)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._update()
        self.bar.close()


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
