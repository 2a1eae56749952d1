"""Independent jobs in worker processes: ``fusionkit ablate --jobs N`` (one variant × seed per worker).

Small models on a CPU use two cores badly from one process (intra-op threads wait on each other
for matrices of a few thousand rows), so ``N`` processes of ``cores / N`` threads each finish a list of
independent runs sooner (the binding benchmark on 2 cores: 1.2-1.3x the steps per second). The workers are started once (``spawn``: nothing of the parent's threads
or open files is inherited) and live for all the jobs, so what a process keeps in memory (decoded
clips, the frozen-feature cache) is reused by the later jobs of the same worker.

A job writes its console output into its own log file; :func:`run_jobs` yields ``(index, result)``
as the jobs finish, in finishing order, and re-raises the first failure after cancelling the jobs
that have not started.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def threads_per_job(jobs: int) -> int:
    """Torch threads of each of ``jobs`` workers: the cores shared out, at least one."""
    return max(1, (os.cpu_count() or 1) // max(jobs, 1))


def _start_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _logged(fn: Callable[..., Any], log: str, args: Sequence[Any]) -> Any:
    """Run ``fn(*args, console=<console writing to log>)`` in a worker."""
    from rich.console import Console

    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as stream:
        return fn(*args, console=Console(file=stream, width=150, force_terminal=False, color_system=None))


@contextmanager
def job_pool(jobs: int) -> Iterator[ProcessPoolExecutor | None]:
    """``jobs`` worker processes (``None`` for one job: everything runs in this process)."""
    if jobs <= 1:
        yield None
        return
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                               initargs=(threads_per_job(jobs),))
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_jobs(pool: ProcessPoolExecutor, fn: Callable[..., Any],
             jobs: Iterable[tuple[Sequence[Any], Path]]) -> Iterator[tuple[int, Any]]:
    """Submit ``fn(*args, console=...)`` for every ``(args, log file)``; yield ``(index, result)`` as each ends."""
    pending: dict[Future, int] = {pool.submit(_logged, fn, str(log), tuple(args)): i
                                  for i, (args, log) in enumerate(jobs)}
    try:
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                index = pending.pop(future)
                yield index, future.result()
    finally:
        for future in pending:
            future.cancel()
