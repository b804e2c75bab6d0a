"""Planning in the background, so that the plan for step i+1 is ready when step i ends.

The planner is CPU-bound Python, so it runs in its own process (spawned: safe beside
torch and its threads). `submit` returns a `concurrent.futures.Future`.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor

import numpy as np

from .core import Planner
from .plan import Plan

_planner: Planner | None = None


def _die_with_parent(parent_pid: int) -> None:
    """The planning process must not outlive the rank that started it (a crashed rank would
    otherwise leave it running, holding the job's output pipes): ask the kernel to signal it
    when the parent dies (Linux), and poll as a fallback everywhere else."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="planner-parent-watch", daemon=True).start()


def _init(planner: Planner, parent_pid: int) -> None:
    global _planner
    _die_with_parent(parent_pid)
    _planner = planner


def _plan(lengths: np.ndarray, degree: int | str | None, cost=None) -> Plan | None:
    assert _planner is not None
    if cost is not None:  # a refit cost model (planner/calibrate.py) replaces the one it started with
        _planner.cost = cost
    return _planner.plan_for(lengths, degree)


class PlanningService:
    def __init__(self, planner: Planner):
        self.planner = planner
        self._sent_cost = planner.cost
        self._pool = ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"),
                                         initializer=_init, initargs=(planner, os.getpid()))

    def submit(self, lengths, degree: int | str | None = None) -> "Future[Plan | None]":
        """`Planner.plan_for(lengths, degree)` in the background: the adaptive plan of a batch;
        with an int `degree`, the plan with every group of that size; with BATCH_ADAPTIVE the
        best uniform degree's (None when the batch does not fit). Plans with
        `self.planner.cost`: a cost model refit since the last call travels with this one."""
        cost = self.planner.cost
        changed = cost is not self._sent_cost
        self._sent_cost = cost
        return self._pool.submit(_plan, np.asarray(lengths, dtype=np.int64), degree, cost if changed else None)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "PlanningService":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
