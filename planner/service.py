"""Planning in the background, so that the plan for step i+1 is ready when step i ends.

The planner is CPU-bound Python, so it runs in its own process (spawned: safe beside
torch and its threads). `submit` returns a `concurrent.futures.Future[Plan]`.
"""
from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import Future, ProcessPoolExecutor

import numpy as np

from .core import Planner
from .plan import Plan

_planner: Planner | None = None


def _init(planner: Planner) -> None:
    global _planner
    _planner = planner


def _plan(lengths: np.ndarray) -> Plan:
    assert _planner is not None
    return _planner.plan(lengths)


class PlanningService:
    def __init__(self, planner: Planner):
        self.planner = planner
        self._pool = ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"),
                                         initializer=_init, initargs=(planner,))

    def submit(self, lengths) -> "Future[Plan]":
        return self._pool.submit(_plan, np.asarray(lengths, dtype=np.int64))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "PlanningService":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
