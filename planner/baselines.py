"""Baselines priced by the same cost model as the adaptive plan.

* static: one SP degree for the whole run, the smallest that holds the longest sequence the
  run allows (how DeepSpeed-Ulysses and Megatron users configure long-context runs),
  sequences best-packed into its groups;
* fixed-s: every uniform degree s that tiles the cluster, for the comparison table;
* BatchAda: the best single degree chosen per batch (FlexSP's batch-adaptive baseline);
* no SP: degree 1, where every sequence fits one device.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .core import Planner
from .errors import PlanningError


def static_degree(planner: Planner, max_len: int) -> int:
    """Smallest uniform degree whose groups hold a sequence of `max_len` tokens."""
    for s in planner.fixed_degrees():
        if planner.cost.seq_fits(np.array([max_len]), s)[0]:
            return s
    longest, size = planner.longest_supported()
    raise PlanningError(f"no uniform SP degree holds a {max_len}-token sequence; the longest this cluster "
                        f"supports is {longest} tokens (group of {size})")


@dataclass
class Baselines:
    static_degree: int
    static_ms: float | None
    fixed_ms: dict[int, float | None]  # None: some sequence does not fit that degree
    batchada_degree: int
    batchada_ms: float

    @property
    def no_sp_ms(self) -> float | None:
        return self.fixed_ms.get(1)


def baselines(planner: Planner, lengths, max_len: int | None = None) -> Baselines:
    arr = planner.check_lengths(lengths)
    run_max = int(max_len) if max_len is not None else int(arr.max())
    if run_max < int(arr.max()):
        raise PlanningError(f"max_len={run_max} is shorter than the batch's longest sequence ({int(arr.max())})")
    fixed = {s: None if plan is None else plan.predicted_ms for s, plan in planner.fixed_plans(arr).items()}
    feasible = {s: ms for s, ms in fixed.items() if ms is not None}
    if not feasible:
        raise PlanningError("no uniform SP degree can run this batch")
    best = min(feasible, key=lambda s: feasible[s])
    st = static_degree(planner, run_max)
    return Baselines(static_degree=st, static_ms=fixed[st], fixed_ms=fixed, batchada_degree=best,
                     batchada_ms=feasible[best])
