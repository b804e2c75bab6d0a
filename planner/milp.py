"""MILP for one micro-batch (PuLP; HiGHS when highspy is installed, else CBC).

Decisions: how many SP groups of each size (through node patterns, so every group fits
the node layout exactly), which group each long sequence joins, and how many sequences of
each short-length bucket each group size takes. Objective: the makespan T.

    min T
    s.t. sum_pi p_pi + sum_{s>node} (s/node) g_s = nodes                 (node layout)
         sum_k u_{s,k} = m_s(p, g);  u_{s,k} >= u_{s,k+1}                  (group instances, symmetry broken)
         sum_{s,k} x_{j,s,k} = 1;  x_{j,s,k} <= u_{s,k}                   (each long sequence once)
         sum_s y_{b,s} = c_b                                               (each bucket's sequences once)
         sum_k z_{s,k} = sum_b tbar_{b,s} y_{b,s}                          (short load of size class s)
         l_{s,k} = sum_j t_{j,s} x_{j,s,k} + z_{s,k} <= (T_ub - beta) u_{s,k};  l_{s,k} >= l_{s,k+1}
         T >= beta + l_{s,k}
         sum_j mem_{j,s} x_{j,s,k} + rho_s z_{s,k} <= (M - M_states) u_{s,k}   (device memory)

Long sequences (the few that dominate the makespan) are placed individually; the many
short ones are bucketed by length (FlexSP's trick to keep the model small) and spread
within a size class as a divisible load. `realise` keeps the MILP's group mix and its
placement of the long sequences and list-schedules the bucketed ones over all groups (a
bucket's members are not small next to T on every batch, so spreading them by the model's
counts alone realises poorly); the caller polishes the result with local search and keeps
whichever of the MILP's and the heuristic's schedules is better. The solver's dual bound
gives the plan's reported gap.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pulp

from .cost import CostModel
from .errors import PlanningError
from .layout import node_patterns, place_groups
from .schedule import SeqTable, WorkGroup, list_schedule


def highs_available() -> bool:
    try:
        import highspy  # noqa: F401
    except ImportError:
        return False
    return True


def pick_solver(name: str) -> str:
    """'auto' means HiGHS when highspy is installed, else CBC (bundled with PuLP)."""
    if name == "auto":
        return "highs" if highs_available() else "cbc"
    if name == "highs" and not highs_available():
        raise PlanningError("planner.solver: 'highs' needs the highspy package (pip install highspy); "
                            "use 'cbc' or 'auto'")
    return name


class _WarmHiGHS(pulp.HiGHS):  # type: ignore[misc, valid-type]
    """PuLP's in-process HiGHS, plus a MIP start from the variables' initial values and the
    solver's dual bound after the run."""

    dual_bound: float | None = None

    def callSolver(self, lp):  # noqa: N802 (PuLP's name)
        import highspy

        values = [v.varValue for v in lp.variables()]
        if all(x is not None for x in values):
            sol = highspy.HighsSolution()
            sol.col_value = [float(x) for x in values]
            sol.value_valid = True
            lp.solverModel.setSolution(sol)
        lp.solverModel.run()
        info = lp.solverModel.getInfo()
        self.dual_bound = float(info.mip_dual_bound)


@dataclass
class MilpResult:
    groups: list[WorkGroup] | None
    status: str
    objective_ms: float | None
    bound_ms: float | None
    n_variables: int
    n_constraints: int
    solve_s: float
    warm_start: bool = False  # whether the heuristic's schedule was given as a MIP start


def group_instances(cost: CostModel, sizes: list[int], n: int) -> dict[int, int]:
    """Group instances the model holds per size: as many as the cluster can hold, but no more
    busy groups than sequences."""
    nodes, per_node = cost.world_size // cost.devices_per_node, cost.devices_per_node
    k_max = {}
    for s in sizes:
        fit = nodes * (per_node // s) if s <= per_node else nodes // (s // per_node)
        k_max[s] = fit if s == 1 else min(fit, n)
    return {s: k for s, k in k_max.items() if k > 0}


# PuLP builds the model at about this many seconds per group instance (measured: 0.35 s for
# the 172 instances at 64 GPUs), and the build cannot be interrupted
BUILD_S_PER_INSTANCE = 2e-3


def build_estimate_s(cost: CostModel, sizes: list[int], n: int) -> float:
    return BUILD_S_PER_INSTANCE * sum(group_instances(cost, sizes, n).values())


def _buckets(order: np.ndarray, weight: np.ndarray, n_buckets: int) -> list[np.ndarray]:
    """Split `order` (sorted by length, descending) into contiguous buckets of ~equal weight."""
    if len(order) == 0:
        return []
    cum = np.cumsum(weight[order])
    edges = np.searchsorted(cum, cum[-1] * np.arange(1, n_buckets) / n_buckets, side="right")
    parts = np.split(order, np.unique(edges))
    return [p for p in parts if len(p)]


def solve_milp(table: SeqTable, cost: CostModel, warm: list[WorkGroup], upper_ms: float, *, solver: str,
               time_limit_s: float, n_buckets: int, max_long: int, threads: int = 1, mip_gap: float = 0.002
               ) -> MilpResult:
    t0 = time.perf_counter()
    n = len(table)
    world, per_node = cost.world_size, cost.devices_per_node
    nodes = world // per_node
    beta = cost.beta_ms
    cap_ms = max(upper_ms * 1.02 - beta, 0.0)  # a little above the warm start, which the buckets price roughly
    sizes = table.sizes
    small = tuple(s for s in sizes if s <= per_node)
    large = [s for s in sizes if s > per_node]
    patterns = node_patterns(per_node, small)

    single = cost.single_device_ms(table.lengths)
    by_len = np.argsort(-table.lengths, kind="stable")
    longs = [int(j) for j in np.argsort(-single, kind="stable")[:max_long]]
    long_set = set(longs)
    shorts = np.array([j for j in by_len if int(j) not in long_set], dtype=np.int64)
    buckets = _buckets(shorts, single, n_buckets)

    k_max = group_instances(cost, sizes, n)

    prob = pulp.LpProblem("sp_plan", pulp.LpMinimize)
    T = prob.add_variable("T", lowBound=beta)
    prob += T

    p = {i: prob.add_variable(f"p_{i}", lowBound=0, upBound=nodes, cat="Integer") for i in range(len(patterns))}
    g = {s: prob.add_variable(f"g_{s}", lowBound=0, upBound=nodes // (s // per_node), cat="Integer") for s in large
         if s in k_max}
    prob += pulp.lpSum(p.values()) + pulp.lpSum((s // per_node) * v for s, v in g.items()) == nodes
    u = {(s, k): prob.add_variable(f"u_{s}_{k}", cat="Binary") for s in k_max for k in range(k_max[s])}
    for s in k_max:
        if s <= per_node:
            m_s = pulp.lpSum(pat.count(s) * p[i] for i, pat in enumerate(patterns) if s in pat)
        else:
            m_s = g[s]
        prob += pulp.lpSum(u[s, k] for k in range(k_max[s])) == m_s
        for k in range(k_max[s] - 1):
            prob += u[s, k] >= u[s, k + 1]

    # long sequences, placed individually, in the first instances of each size
    n_long_slots = {s: min(k_max[s], len(longs)) for s in k_max}
    x: dict[tuple[int, int, int], pulp.LpVariable] = {}
    for j in longs:
        opts = []
        for s in k_max:
            tj = table.t[j, table.col[s]]
            if np.isfinite(tj) and tj <= cap_ms * (1 + 1e-9):
                for k in range(n_long_slots[s]):
                    x[j, s, k] = v = prob.add_variable(f"x_{j}_{s}_{k}", cat="Binary")
                    opts.append(v)
                    prob += v <= u[s, k]
        if not opts:
            return MilpResult(None, "infeasible: a long sequence exceeds the heuristic makespan", None, None, 0, 0,
                              time.perf_counter() - t0)
        prob += pulp.lpSum(opts) == 1

    # short sequences, by bucket and size class
    y: dict[tuple[int, int], pulp.LpVariable] = {}
    tbar: dict[tuple[int, int], float] = {}
    rho: dict[int, float] = {s: 0.0 for s in k_max}
    for b, members in enumerate(buckets):
        opts = []
        for s in k_max:
            col = table.t[members, table.col[s]]
            if not np.all(np.isfinite(col)):
                continue
            tbar[b, s] = float(col.mean())
            y[b, s] = v = prob.add_variable(f"y_{b}_{s}", lowBound=0, upBound=len(members), cat="Integer")
            opts.append(v)
            _, per_token, per_seq = cost.memory_coeffs(s)
            mem = per_token * float(table.pad[members, table.col[s]].mean()) + per_seq
            rho[s] = max(rho[s], mem / tbar[b, s]) if tbar[b, s] > 0 else rho[s]  # bytes per ms, worst bucket
        if not opts:
            return MilpResult(None, "infeasible: a short bucket fits no group size", None, None, 0, 0,
                              time.perf_counter() - t0)
        prob += pulp.lpSum(opts) == len(members)

    z = {(s, k): prob.add_variable(f"z_{s}_{k}", lowBound=0) for (s, k) in u}
    load = {}
    for s in k_max:
        prob += pulp.lpSum(z[s, k] for k in range(k_max[s])) == pulp.lpSum(
            tbar[b, s] * y[b, s] for b in range(len(buckets)) if (b, s) in y)
        base, per_token, per_seq = cost.memory_coeffs(s)
        room = cost.device_memory_bytes - base
        for k in range(k_max[s]):
            longs_here = [(j, x[j, s, k]) for j in longs if (j, s, k) in x]
            load[s, k] = pulp.lpSum(table.t[j, table.col[s]] * v for j, v in longs_here) + z[s, k]
            prob += load[s, k] <= cap_ms * u[s, k]
            prob += T >= beta + load[s, k]
            prob += (pulp.lpSum((per_token * table.pad[j, table.col[s]] + per_seq) * v for j, v in longs_here)
                     + rho[s] * z[s, k] <= room * u[s, k])
            if k > n_long_slots[s]:  # instances that cannot hold long sequences are interchangeable
                prob += load[s, k - 1] >= load[s, k]

    # every device is in one group, so the device-time of all loads fits in N x (T - beta)
    prob += world * (T - beta) >= pulp.lpSum(s * load[s, k] for (s, k) in load)

    warm_ok = _set_warm_start(warm, table, cost, patterns, k_max, n_long_slots, p, g, u, x, y, z, T, buckets, tbar,
                              long_set)

    n_vars, n_cons = prob.numVariables(), prob.numConstraints()
    remaining = time_limit_s - (time.perf_counter() - t0)
    if remaining <= 0.05:
        return MilpResult(None, "not_run: no time left after building the model", None, None, n_vars, n_cons,
                          time.perf_counter() - t0, warm_ok)
    if solver == "highs":
        engine = _WarmHiGHS(msg=False, timeLimit=remaining, threads=threads, gapRel=mip_gap)
    else:
        # CBC's preprocessing has declared "optimal" above the true optimum on these models (a 6-sequence
        # case found by the brute-force test); without it CBC is exact and still fast enough here
        engine = pulp.PULP_CBC_CMD(msg=False, timeLimit=max(1, int(remaining)), warmStart=True, threads=threads,
                                   gapRel=mip_gap, options=["preprocess off"])
    try:
        prob.solve(engine)
    except pulp.PulpSolverError as e:
        return MilpResult(None, f"failed: {e}", None, None, n_vars, n_cons, time.perf_counter() - t0, warm_ok)
    status = pulp.LpStatus[prob.status]
    has_solution = prob.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible)
    if not has_solution or T.varValue is None:
        return MilpResult(None, f"no_solution ({status})", None, None, n_vars, n_cons, time.perf_counter() - t0,
                          warm_ok)
    bound = getattr(engine, "dual_bound", None)
    sol_status = "optimal" if prob.sol_status == pulp.LpSolutionOptimal else "time_limit"
    if sol_status == "optimal" and bound is None:
        bound = float(T.varValue)
    groups = realise(table, cost, u, x, longs)
    return MilpResult(groups, sol_status, float(T.varValue), bound, n_vars, n_cons, time.perf_counter() - t0,
                      warm_ok)


def _val(v: pulp.LpVariable) -> float:
    return 0.0 if v.varValue is None else float(v.varValue)


def realise(table: SeqTable, cost: CostModel, u, x, longs) -> list[WorkGroup] | None:
    """Concrete groups from the MILP's answer: its group mix, the long sequences where it put
    them, and the bucketed sequences list-scheduled (earliest finish) over all groups."""
    groups: dict[tuple[int, int], WorkGroup] = {}
    for (s, k), v in u.items():
        if _val(v) > 0.5:
            groups[s, k] = WorkGroup(s, table.col[s])
    for j in longs:
        for (jj, s, k), v in x.items():
            if jj == j and _val(v) > 0.5:
                if (s, k) not in groups or not groups[s, k].can_hold(j, table, cost):
                    return None
                groups[s, k].add(j, table)
                break
        else:
            return None
    ordered = list(groups.values())
    placed = set(longs)
    rest = [j for j in range(len(table)) if j not in placed]
    if not list_schedule(rest, ordered, table, cost):
        return None
    if place_groups([gr.size for gr in ordered if gr.seqs], cost.world_size, cost.devices_per_node) is None:
        return None
    used = sum(gr.size for gr in ordered)
    ordered += [WorkGroup(1, table.col[1]) for _ in range(cost.world_size - used)] if 1 in table.col else []
    return ordered


def _set_warm_start(warm, table, cost, patterns, k_max, n_long_slots, p, g, u, x, y, z, T, buckets, tbar,
                    long_set) -> bool:
    """Map the heuristic's schedule onto the model's variables as a MIP start. Short loads
    are rescaled per size class to the bucket prices the model uses, so the start satisfies
    the model's equalities. False if the schedule has no image in the model."""
    per_node = cost.devices_per_node
    nodes = cost.world_size // per_node
    busy = [gr for gr in warm if gr.seqs]
    starts = place_groups([gr.size for gr in busy], cost.world_size, per_node)
    if starts is None or any(gr.size not in k_max for gr in busy):
        return False
    # node patterns: the small groups of each node, topped up with groups of one
    fill: list[list[int] | None] = [[] for _ in range(nodes)]
    large: Counter[int] = Counter()
    for gr, st in zip(busy, starts):
        if gr.size > per_node:
            large[gr.size] += 1
            for nd in range(st // per_node, (st + gr.size) // per_node):
                fill[nd] = None
        else:
            fill[st // per_node].append(gr.size)  # type: ignore[union-attr]
    index = {pat: i for i, pat in enumerate(patterns)}
    pat_count: Counter[int] = Counter()
    for nd_fill in fill:
        if nd_fill is None:
            continue
        key = tuple(sorted(nd_fill + [1] * (per_node - sum(nd_fill)), reverse=True))
        if key not in index:
            return False
        pat_count[index[key]] += 1
    m: Counter[int] = Counter(large)
    for i, pat in enumerate(patterns):
        for s in pat:
            m[s] += pat_count[i]
    if any(m[s] > k_max.get(s, 0) for s in m):
        return False
    # instances: groups holding long sequences first, then the rest by load, then idle ones
    slots: dict[int, list[WorkGroup | None]] = {}
    for s in k_max:
        mine = [gr for gr in busy if gr.size == s]
        with_long = sorted((gr for gr in mine if long_set.intersection(gr.seqs)), key=lambda gr: -gr.load)
        without = sorted((gr for gr in mine if not long_set.intersection(gr.seqs)), key=lambda gr: -gr.load)
        if len(with_long) > n_long_slots[s]:
            return False
        order: list[WorkGroup | None] = list(with_long) + [None] * (n_long_slots[s] - len(with_long))
        order = [o for o in order if o is not None] + without  # keep busy ones contiguous
        slots[s] = order
    where = {j: gr.size for gr in busy for j in gr.seqs}
    in_bucket: Counter[tuple[int, int]] = Counter()
    for b, members in enumerate(buckets):
        for j in members:
            in_bucket[b, where[int(j)]] += 1
    values: dict[pulp.LpVariable, float] = {}
    for i, v in p.items():
        values[v] = pat_count[i]
    for s, v in g.items():
        values[v] = large[s]
    for s in k_max:
        short_actual = [sum(table.t_rows[j][table.col[s]] for j in gr.seqs if j not in long_set)
                        for gr in slots[s]]
        total_actual = sum(short_actual)
        priced = sum(tbar[b, s] * in_bucket[b, s] for b in range(len(buckets)) if (b, s) in tbar)
        scale = priced / total_actual if total_actual > 0 else 0.0
        for k in range(k_max[s]):
            gr = slots[s][k] if k < len(slots[s]) else None
            values[u[s, k]] = 1 if k < m[s] else 0
            values[z[s, k]] = short_actual[k] * scale if gr is not None else 0.0
            for j in (gr.seqs if gr is not None else []):
                if j in long_set:
                    if (j, s, k) not in x:
                        return False
                    values[x[j, s, k]] = 1
    for v in x.values():
        values.setdefault(v, 0)
    for (b, s), v in y.items():
        values[v] = in_bucket[b, s]
    values[T] = cost.beta_ms + max((gr.load for gr in busy), default=0.0)
    for v, val in values.items():
        v.setInitialValue(val)
    return True
