"""Fast heuristic for one micro-batch: target-makespan group sizing plus list scheduling.

Why it works: a sequence's device-time, s x (its time in a group of s), grows with s
(communication), so every sequence wants the smallest group that holds it; only a
sequence that alone would exceed the makespan target needs a larger group. For a target T
the heuristic therefore (1) gives each such long sequence the smallest group size that
finishes it within T, sharing groups best-fit, (2) covers the remaining ranks with groups
of one, and (3) list-schedules the short sequences, earliest finish first. It sweeps T
between the lower bound and the no-target answer and keeps the best makespan, then
improves that with local search. Its answer is the MILP's warm start and the fallback
when the MILP's time runs out.
"""
from __future__ import annotations

import time

import numpy as np

from .cost import CostModel
from .layout import place_groups
from .schedule import SeqTable, WorkGroup, improve, list_schedule, new_groups, priced_ms


def greedy_for_target(table: SeqTable, cost: CostModel, target_ms: float) -> list[WorkGroup] | None:
    cap = target_ms - cost.beta_ms
    world, per_node = cost.world_size, cost.devices_per_node
    groups: list[WorkGroup] = []
    short: list[int] = []
    used = 0
    within = np.isfinite(table.t) & (table.t <= cap)
    # the smallest size that finishes the sequence within the target; if none does, its fastest
    need = np.where(within.any(axis=1), within.argmax(axis=1), table.t.argmin(axis=1))
    for j in np.argsort(-table.lengths, kind="stable"):
        j = int(j)
        c = int(need[j])
        row = table.t[j]
        if row[c] == np.inf:
            return None
        s = table.sizes[c]
        if s == 1:
            short.append(j)
            continue
        best, best_load = None, -1.0
        for g in groups:
            if g.size >= s:
                load = g.load + row[g.col]
                if load <= cap and load > best_load and g.can_hold(j, table, cost):
                    best, best_load = g, load
        if best is None:
            if used + s > world:
                return None
            best = WorkGroup(s, c)
            groups.append(best)
            used += s
        best.add(j, table)
    if place_groups([g.size for g in groups], world, per_node) is None:
        return None
    groups += new_groups(table, [1] * (world - used))
    if not list_schedule(short, groups, table, cost):
        return None
    return groups


def solve_heuristic(table: SeqTable, cost: CostModel, deadline: float, grid: int = 10, refine: int = 6
                    ) -> tuple[list[WorkGroup], float] | None:
    """Best schedule found over a sweep of makespan targets, locally improved."""
    if len(table) == 0:
        return [], 0.0
    lower = float(cost.single_device_ms(table.lengths).sum() / cost.world_size + cost.beta_ms)
    best: tuple[float, float, list[WorkGroup]] | None = None  # (makespan, target, groups)

    def attempt(target: float) -> None:
        nonlocal best
        groups = greedy_for_target(table, cost, target)
        if groups is None:
            return
        ms = priced_ms(groups, cost)
        if best is None or ms < best[0]:
            best = (ms, target, groups)

    attempt(np.inf)
    if best is None:
        return None
    upper = best[0]
    targets = np.geomspace(lower, max(upper, lower * 1.0001), grid)
    for tgt in targets:
        attempt(float(tgt))
        if time.perf_counter() > deadline:
            break
    # refine around the best target
    step = (targets[1] / targets[0]) if grid > 1 else 1.05
    for _ in range(refine):
        if time.perf_counter() > deadline:
            break
        step = step ** 0.5
        centre = best[1] if np.isfinite(best[1]) else upper
        attempt(centre / step)
        attempt(centre * step)
    ms, _, groups = best
    improve(groups, table, cost, deadline)
    return groups, priced_ms(groups, cost)
