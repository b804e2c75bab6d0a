"""Invariants every plan must satisfy; tests and the runtime's debug mode check them."""
from __future__ import annotations

import numpy as np

from .cost import CostModel
from .errors import InvalidPlanError
from .plan import Plan


def plan_problems(plan: Plan, cost: CostModel, allowed_sizes: list[int] | None = None, rel_tol: float = 1e-6
                  ) -> list[str]:
    """Every broken invariant, as a sentence; empty when the plan is valid."""
    problems: list[str] = []
    n_world, per_node = cost.world_size, cost.devices_per_node
    lengths = np.asarray(plan.lengths, dtype=np.int64)
    if plan.world_size != n_world:
        problems.append(f"plan is for {plan.world_size} devices, the cluster has {n_world}")
    seen = np.zeros(len(lengths), dtype=np.int64)
    total = 0.0
    for m, mb in enumerate(plan.micro_batches):
        where = f"micro-batch {m}"
        covered = np.zeros(n_world, dtype=np.int64)
        busy: list[tuple[int, float]] = []
        for g in mb.groups:
            here = f"{where}, group at rank {g.start} (size {g.size})"
            if g.size < 1 or g.start < 0 or g.start + g.size > n_world:
                problems.append(f"{here}: ranks out of range")
                continue
            covered[g.start:g.start + g.size] += 1
            if allowed_sizes is not None and g.seq_ids and g.size not in allowed_sizes:
                problems.append(f"{here}: size not allowed")
            if g.size <= per_node:
                if g.start // per_node != (g.start + g.size - 1) // per_node:
                    problems.append(f"{here}: spans two nodes")
            elif g.start % per_node or g.size % per_node:
                problems.append(f"{here}: larger than a node but not made of whole nodes")
            ids = np.asarray(g.seq_ids, dtype=np.int64)
            if len(ids) and (ids.min() < 0 or ids.max() >= len(lengths)):
                problems.append(f"{here}: sequence id out of range")
                continue
            want = cost.sp_form(g.size, lengths[ids]) if len(ids) else None
            if len(ids) and g.form != want:
                problems.append(f"{here}: runs as {g.form}, the cost model prices {want}")
            np.add.at(seen, ids, 1)
            ls = lengths[ids]
            if g.tokens != int(ls.sum()):
                problems.append(f"{here}: tokens {g.tokens} != {int(ls.sum())}")
            too_big = ls[~cost.seq_fits(ls, g.size)] if len(ls) else ls
            if len(too_big):
                problems.append(f"{here}: a {int(too_big.max())}-token sequence does not fit a group of {g.size}")
            mem = cost.group_memory_bytes(float(cost.padded(ls, g.size).sum()), len(ls), g.size)
            if mem > cost.device_memory_bytes * (1 + rel_tol):
                problems.append(f"{here}: needs {mem / 2**30:.2f} GiB per device, "
                                f"over {cost.device_memory_bytes / 2**30:.2f} GiB")
            expect = cost.group_ms(ls, g.size) if len(ls) else 0.0
            if abs(g.predicted_ms - expect) > rel_tol * max(1.0, expect):
                problems.append(f"{here}: predicted {g.predicted_ms:.3f} ms, cost model says {expect:.3f} ms")
            if g.seq_ids:
                busy.append((g.size, g.predicted_ms))
        if (covered != 1).any():
            bad = np.flatnonzero(covered != 1)
            problems.append(f"{where}: ranks {bad[:8].tolist()} are covered {covered[bad[:8]].tolist()} times "
                            f"(each must be in exactly one group)")
        worst = cost.micro_batch_ms(busy)
        if abs(mb.predicted_ms - worst) > rel_tol * max(1.0, worst):
            problems.append(f"{where}: predicted {mb.predicted_ms:.3f} ms, its groups give {worst:.3f} ms")
        total += mb.predicted_ms
    if (seen != 1).any():
        bad = np.flatnonzero(seen != 1)
        problems.append(f"sequences {bad[:8].tolist()} are planned {seen[bad[:8]].tolist()} times (must be once)")
    if abs(plan.predicted_ms - total) > rel_tol * max(1.0, total):
        problems.append(f"plan predicts {plan.predicted_ms:.3f} ms, its micro-batches sum to {total:.3f} ms")
    return problems


def validate_plan(plan: Plan, cost: CostModel, allowed_sizes: list[int] | None = None) -> None:
    problems = plan_problems(plan, cost, allowed_sizes)
    if problems:
        raise InvalidPlanError("invalid plan:\n  " + "\n  ".join(problems))
