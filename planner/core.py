"""The planner: one global batch of sequence lengths in, one `Plan` out.

    planner = Planner.from_specs(cluster, model, cost, planner_spec)
    plan = planner.plan(lengths)              # adaptive: heuristic + MILP, within the time budget
    fixed = planner.plan_fixed(lengths, 8)    # every group of 8 (a baseline), or None if infeasible
"""
from __future__ import annotations

import gc
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .blaster import candidate_splits, min_micro_batches
from .cost import CostModel
from .errors import PlanningError, SequenceTooLongError
from .heuristic import micro_batch_lower_bound, solve_heuristic
from .layout import allowed_sizes
from .milp import build_estimate_s, pick_solver, solve_milp
from .plan import MicroBatchPlan, Plan, SolverStats
from .schedule import SeqTable, WorkGroup, improve, list_schedule, new_groups, priced_ms, to_micro_batch
from .spec import ClusterSpec, CostSpec, ModelSpec, PlannerSpec


# The MILP is only started with its estimated (not interruptible) build time plus this much
# left for the solver, so that it cannot overrun the wall.
MILP_MIN_S = 0.2


def _better(a: tuple[float, list] | None, b: tuple[float, list] | None) -> tuple[float, list] | None:
    """The cheaper of two searches' answers; the first on a tie, so search order decides ties."""
    if b is None or (a is not None and b[0] >= a[0] - 1e-9):
        return a
    return b


BATCH_ADAPTIVE = "batch"  # plan_for's degree for one uniform degree chosen per batch (BatchAda)
# plan_for's degree for the smallest uniform degree that holds the batch's longest sequence, chosen
# per batch: what verl's and Megatron's dynamic context parallelism do
LONGEST_FITS = "longest"


@dataclass
class _Draft:
    """A micro-batch scheduled by the heuristic (or as a uniform mix), waiting for the MILP."""

    table: SeqTable
    groups: list[WorkGroup]
    ms: float


def _widen(draft: _Draft, full: SeqTable) -> _Draft:
    """A draft found with some of the sizes, restated on the table of all of them."""
    if draft.table.sizes == full.sizes:
        return draft
    same = len(draft.table) == len(full) and np.array_equal(draft.table.ids, full.ids)
    table = full if same else full.subset(draft.table.ids)  # the whole batch in one: no copy (1024 GPUs: 0.1 s)
    for g in draft.groups:
        g.col = table.col[g.size]
    return _Draft(table, draft.groups, draft.ms)


@contextmanager
def _collector_held():
    """Python's cyclic garbage collector off for the duration. The search makes and drops many
    small objects, so the collector would run inside it, and in a large process (a training job,
    a benchmark holding its plans) one full collection takes 50-100 ms: a third of a 0.25 s wall,
    at random. Reference counting still frees nearly everything; the cycles wait until after
    (the switch is process-wide: another thread's cycles wait too, for at most the wall)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class Planner:
    def __init__(self, cost: CostModel, spec: PlannerSpec | None = None):
        self.cost = cost
        self.spec = spec or PlannerSpec()
        if cost.world_size < 1:
            raise PlanningError("the cluster has no devices")
        self.sizes = allowed_sizes(cost.world_size, cost.devices_per_node, self.spec.power_of_two,
                                   self.spec.max_group_size)
        self.solver = pick_solver(self.spec.solver)

    @classmethod
    def from_specs(cls, cluster: ClusterSpec, model: ModelSpec, cost: CostSpec, spec: PlannerSpec | None = None
                   ) -> "Planner":
        return cls(CostModel.from_specs(cluster, model, cost, spec), spec)

    # ----- limits -----
    def longest_supported(self) -> tuple[int, int]:
        """(longest sequence any allowed group can hold, that group's size)."""
        best = (0, 1)
        for s in self.sizes:
            lo, hi = 0, 1
            while self.cost.seq_fits(np.array([hi]), s)[0]:
                lo, hi = hi, hi * 2
                if hi > 1 << 40:
                    break
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if self.cost.seq_fits(np.array([mid]), s)[0]:
                    lo = mid
                else:
                    hi = mid
            if lo > best[0]:
                best = (lo, s)
        return best

    def check_lengths(self, lengths) -> np.ndarray:
        arr = np.asarray(lengths)
        if arr.ndim != 1 or arr.size == 0:
            raise PlanningError("the batch is empty: nothing to plan")
        if not np.issubdtype(arr.dtype, np.integer):
            if not np.all(np.equal(np.mod(arr, 1), 0)):
                raise PlanningError("sequence lengths must be integers")
        arr = arr.astype(np.int64)
        bad = np.flatnonzero(arr <= 0)
        if len(bad):
            raise PlanningError(f"sequence {int(bad[0])} has length {int(arr[bad[0]])}; lengths must be positive")
        fits_any = np.zeros(len(arr), dtype=bool)
        for s in self.sizes:
            fits_any |= self.cost.seq_fits(arr, s)
        if not fits_any.all():
            j = int(np.flatnonzero(~fits_any)[np.argmax(arr[~fits_any])])
            longest, size = self.longest_supported()
            raise SequenceTooLongError(int(arr[j]), j, longest, size)
        return arr

    # ----- micro-batch search, shared by the adaptive and the fixed-degree plans -----
    def _search(self, arr: np.ndarray, solve_part: Callable[[np.ndarray, float], _Draft | None], deadline: float,
                table: SeqTable, optional: bool = False
                ) -> tuple[dict[int, float | None], tuple[float, list[_Draft]] | None]:
        """Try micro-batch counts from the memory minimum up; stop at the first count whose
        plan is worse than the best found or whose lower bound (with the table's sizes) cannot
        beat it, or at the deadline. Past the deadline no part is started once a plan exists:
        one of this search's, or with `optional` the caller's (the search may then find none)."""
        candidates: dict[int, float | None] = {}
        best: tuple[float, list[_Draft]] | None = None
        k = min_micro_batches(arr, self.cost)
        while k <= min(self.spec.max_micro_batches, len(arr)):
            if best is not None and micro_batch_lower_bound(table, self.cost, k) >= best[0] - 1e-9:
                break  # no split into k (or more) micro-batches can beat the best found
            found: tuple[float, list[_Draft]] | None = None
            splits = candidate_splits(arr, k, self.cost)
            for si, (_, parts) in enumerate(splits):
                drafts = []
                for i, ids in enumerate(parts):
                    if time.perf_counter() > deadline and (optional or best is not None or found is not None):
                        # out of time: the best complete plan so far (a split of this count if better)
                        if found is not None:
                            candidates[k] = found[0]
                            best = _better(best, found)
                        return candidates, best
                    # every part still to solve in this count gets an equal share of the time left; the
                    # first two splits (min-max, snake) share it as if they were the only ones, so the
                    # sorted cuts after them only add candidates (more splits never plan worse)
                    ahead = len(splits) - si if si >= 2 else min(2, len(splits)) - si
                    left = ahead * len(parts) - i
                    d = solve_part(ids, time.perf_counter() + max(0.0, deadline - time.perf_counter()) / left)
                    if d is None:
                        break
                    drafts.append(d)
                else:
                    total = sum(d.ms for d in drafts)
                    if found is None or total < found[0]:
                        found = (total, drafts)
            candidates[k] = None if found is None else found[0]
            if found is not None and best is not None and found[0] >= best[0]:
                break
            if found is not None:
                best = found
            if best is not None and time.perf_counter() > deadline:
                break
            k += 1
        return candidates, best

    def _heuristic_part(self, full: SeqTable, done: dict | None = None
                        ) -> Callable[[np.ndarray, float], _Draft | None]:
        def solve(ids: np.ndarray, deadline: float) -> _Draft | None:
            table = full.subset(ids)
            solved = solve_heuristic(table, self.cost, deadline, done=done)
            return None if solved is None else _Draft(table, *solved)
        return solve

    def _uniform_part(self, full: SeqTable, s: int) -> Callable[[np.ndarray, float], _Draft | None]:
        def solve(ids: np.ndarray, deadline: float) -> _Draft | None:
            table = full.subset(ids)
            groups = new_groups(table, [s] * (self.cost.world_size // s))
            if not list_schedule(list(range(len(table))), groups, table, self.cost):
                return None
            improve(groups, table, self.cost, deadline)
            return _Draft(table, groups, priced_ms(groups, self.cost))
        return solve

    # ----- adaptive -----
    def families(self) -> list[list[int]]:
        """The size sets the adaptive search runs over: the allowed sizes' powers of two, then all
        of them. Each runs the same deterministic search a planner restricted to it would run, so
        allowing more sizes never gives a worse plan than the power-of-two subset (the search is
        a heuristic: more choices can lead its greedy steps elsewhere). The powers of two go
        first: their search is the cheaper, and on the 64-GPU Wikipedia batches the better one
        on 30 of 44 batches (the other sizes win 4)."""
        pow2 = [s for s in self.sizes if s & (s - 1) == 0]
        return [self.sizes] if pow2 == self.sizes else [pow2, self.sizes]

    def plan(self, lengths) -> Plan:
        """The adaptive plan. `planner.time_limit_s` is a wall on the whole call: every search
        loop checks it, and the best plan found so far is returned when it passes."""
        with _collector_held():
            return self._plan(lengths)

    def _plan(self, lengths) -> Plan:
        t0 = time.perf_counter()
        arr = self.check_lengths(lengths)
        search_end = t0 + 0.85 * self.spec.time_limit_s  # leaves time to place and price the answer
        full = SeqTable.build(self.cost, arr, np.arange(len(arr)), self.sizes)
        candidates: dict[int, float | None] = {}
        best: tuple[float, list[_Draft]] | None = None
        k_min = min_micro_batches(arr, self.cost)
        bound = micro_batch_lower_bound(full, self.cost, k_min)

        def done() -> bool:  # out of time, or at the bound: nothing can be better
            return best is not None and (time.perf_counter() > search_end or best[0] <= bound * (1 + 1e-9))

        families = self.families()
        completed: dict = {}  # completions the families share
        first_s = 0.0  # how long the first family took: a later one starts only with half that left
        for fi, sizes in enumerate(families):
            left = search_end - time.perf_counter()
            if done() or (fi > 0 and left < 0.5 * first_s):
                break
            table = full if sizes == self.sizes else full.restrict(sizes)
            # the first family may take 75% of the time left, the second 80% of the rest;
            # the uniform degrees (mostly skipped by their bounds) get what remains
            started = time.perf_counter()
            found_k, found = self._search(arr, self._heuristic_part(table, completed),
                                          started + left * (0.75 if fi == 0 else 0.8), table, best is not None)
            first_s = first_s or time.perf_counter() - started
            for k, v in found_k.items():  # each count's best over the families
                if candidates.get(k) is None or (v is not None and v < candidates[k]):
                    candidates[k] = v
            best = _better(best, found)
        # every uniform degree is in the adaptive space too, searched as `plan_fixed` searches it,
        # so the plan is never worse than one degree for all (BatchAda); a degree whose own lower
        # bound cannot beat the best found is skipped
        for s in self.fixed_degrees():
            if done():
                break
            if s not in full.col or not np.isfinite(full.t[:, full.col[s]]).all():
                continue
            one = full.restrict([s])
            if best is not None and micro_batch_lower_bound(one, self.cost, k_min) >= best[0] - 1e-9:
                continue
            _, uni = self._search(arr, self._uniform_part(one, s), search_end, one, best is not None)
            best = _better(best, uni)
        if best is None:
            raise PlanningError(
                f"no plan fits device memory with up to {self.spec.max_micro_batches} micro-batches "
                f"(planner.max_micro_batches); the batch holds {int(arr.sum())} tokens in {len(arr)} sequences"
            )
        drafts = best[1]
        micro = [self._refine(d, full, search_end, len(drafts) - i) for i, d in enumerate(drafts)]
        return self._assemble("adaptive", arr, micro, t0, candidates, full)

    def _refine(self, draft: _Draft, full: SeqTable, deadline: float, left: int) -> MicroBatchPlan:
        """The MILP on a drafted micro-batch, with every allowed size, where the time left covers
        building it and a useful solve and the draft is not proven optimal; the draft otherwise
        (each check is made only when the cheaper ones before it pass: at 1024 GPUs widening the
        table to every size and its bound cost 0.1 s each)."""
        t0 = time.perf_counter()
        stats = SolverStats(source="heuristic", status="not_run", solve_s=0.0, heuristic_ms=draft.ms)
        groups, ms = draft.groups, draft.ms
        share = (deadline - t0) / max(left, 1)
        polish_s = min(0.1, 0.1 * share)  # kept back to polish the MILP's answer
        build_s = build_estimate_s(self.cost, full.sizes, len(draft.table))
        run = self.solver != "heuristic" and len(draft.table) > 1 and share - polish_s > build_s + MILP_MIN_S
        if run:
            draft = _widen(draft, full)
            run = ms > micro_batch_lower_bound(draft.table, self.cost) * (1 + 1e-9)  # else proven optimal already
        milp_s = t0 + share - polish_s - 0.02 - time.perf_counter()  # what widening left
        if run and milp_s > build_s + MILP_MIN_S:
            res = solve_milp(draft.table, self.cost, draft.groups, draft.ms, solver=self.solver,
                             time_limit_s=milp_s, n_buckets=self.spec.buckets,
                             max_long=self.spec.max_long_sequences, threads=self.spec.threads,
                             mip_gap=self.spec.mip_gap)
            stats.status, stats.n_variables, stats.n_constraints = res.status, res.n_variables, res.n_constraints
            stats.milp_objective_ms, stats.milp_bound_ms = res.objective_ms, res.bound_ms
            stats.warm_start = res.warm_start
            stats.milp_exact = len(draft.table) <= self.spec.max_long_sequences
            if res.groups is not None:
                improve(res.groups, draft.table, self.cost, time.perf_counter() + polish_s)
                milp_ms = priced_ms(res.groups, self.cost)
                stats.milp_ms = milp_ms
                if milp_ms < ms - 1e-9 and to_micro_batch(res.groups, draft.table, self.cost, stats) is not None:
                    groups, ms, stats.source = res.groups, milp_ms, "milp"
        if stats.milp_bound_ms is not None and ms > 0:
            stats.gap = max(0.0, (ms - stats.milp_bound_ms) / ms)
        stats.solve_s = time.perf_counter() - t0
        mb = to_micro_batch(groups, draft.table, self.cost, stats)
        if mb is None:  # cannot happen for heuristic groups: they were placed when built
            raise PlanningError("internal: the chosen groups do not fit the node layout")
        return mb

    # ----- fixed degree (baselines) -----
    def fixed_degree_ok(self, s: int) -> bool:
        """A uniform degree must tile the cluster: divide a node, or be whole nodes dividing the world."""
        n, d = self.cost.world_size, self.cost.devices_per_node
        if s <= d:
            return d % s == 0
        return s % d == 0 and n % s == 0

    def fixed_degrees(self) -> list[int]:
        return [s for s in allowed_sizes(self.cost.world_size, self.cost.devices_per_node) if self.fixed_degree_ok(s)]

    def plan_fixed(self, lengths, s: int, time_budget_s: float = 0.5) -> Plan | None:
        """Every group of size s, sequences best-packed (list scheduling + local search),
        micro-batched when memory needs it. None if some sequence does not fit a group of s."""
        t0 = time.perf_counter()
        arr = np.asarray(lengths, dtype=np.int64)
        if not self.fixed_degree_ok(s):
            raise PlanningError(f"degree {s} does not tile {self.cost.world_size} devices "
                                f"in nodes of {self.cost.devices_per_node}")
        if not self.cost.seq_fits(arr, s).all():
            return None
        full = SeqTable.build(self.cost, arr, np.arange(len(arr)), [s])
        candidates, best = self._search(arr, self._uniform_part(full, s), t0 + time_budget_s, full)
        if best is None:
            return None
        micro = []
        for d in best[1]:
            stats = SolverStats(source="fixed", status="list_schedule", solve_s=0.0)
            mb = to_micro_batch(d.groups, d.table, self.cost, stats)
            if mb is None:
                return None
            micro.append(mb)
        return self._assemble(f"fixed-{s}", arr, micro, t0, candidates)

    def plan_batch_adaptive(self, lengths, time_budget_s: float = 0.5) -> Plan | None:
        """BatchAda (FlexSP's batch-adaptive baseline): the plan of the uniform degree the cost
        model prices fastest for this batch, every group of that size (None if no degree holds
        it). `time_budget_s` is each degree's search."""
        plans = [p for p in self.fixed_plans(lengths, time_budget_s).values() if p is not None]
        return min(plans, key=lambda p: p.predicted_ms) if plans else None

    def plan_longest_fits(self, lengths, time_budget_s: float = 0.5) -> Plan | None:
        """Every group of the smallest uniform degree that holds the batch's longest sequence
        (None if no degree does): one degree per batch, from its longest sequence alone."""
        arr = np.asarray(lengths, dtype=np.int64)
        longest = arr[[int(arr.argmax())]] if len(arr) else arr
        for s in self.fixed_degrees():
            if self.cost.seq_fits(longest, s).all():
                return self.plan_fixed(arr, s, time_budget_s)
        return None

    def fixed_plans(self, lengths, time_budget_s: float = 0.5) -> dict[int, Plan | None]:
        """Every uniform degree's plan of the batch (None where a sequence does not fit it)."""
        return {s: self.plan_fixed(lengths, s, time_budget_s) for s in self.fixed_degrees()}

    def plan_for(self, lengths, degree: int | str | None = None) -> Plan | None:
        """The adaptive plan (degree None); every group of size `degree` (an int); the best
        uniform degree for this batch (degree BATCH_ADAPTIVE); or the smallest uniform degree
        that holds its longest sequence (LONGEST_FITS). None if the batch does not fit."""
        if degree is None:
            return self.plan(lengths)
        if degree == BATCH_ADAPTIVE:
            return self.plan_batch_adaptive(lengths)
        if degree == LONGEST_FITS:
            return self.plan_longest_fits(lengths)
        return self.plan_fixed(lengths, degree)

    # ----- common -----
    def _assemble(self, strategy: str, arr: np.ndarray, micro: list[MicroBatchPlan], t0: float,
                  candidates: dict[int, float | None], table: SeqTable | None = None) -> Plan:
        return Plan(
            strategy=strategy,
            world_size=self.cost.world_size,
            devices_per_node=self.cost.devices_per_node,
            lengths=[int(x) for x in arr],
            micro_batches=micro,
            predicted_ms=float(sum(mb.predicted_ms for mb in micro)),
            lower_bound_ms=self.lower_bound_ms(arr, micro, table),
            solve_s=time.perf_counter() - t0,
            micro_batch_candidates=candidates,
        )

    def lower_bound_ms(self, arr: np.ndarray, micro: list[MicroBatchPlan] | None = None,
                       table: SeqTable | None = None) -> float:
        """The cost model's bound (the divisible LP's optimum, `CostModel.lower_bound_ms`), raised
        to the MILP's dual bound where that bounds every plan: the MILP placed every sequence
        individually (its model is then exact), over the whole batch as one micro-batch, on
        dedicated devices; a split into more micro-batches is bounded by the model's bound for two."""
        k_min = min_micro_batches(arr, self.cost)
        if table is not None and table.sizes == self.sizes and len(table) == len(arr):
            bound = micro_batch_lower_bound(table, self.cost, k_min)  # the same figure, from the table's costs
        else:
            bound = self.cost.lower_bound_ms(arr, self.sizes, k_min)
        shared = self.cost.cores is not None and self.cost.cores < self.cost.world_size
        if micro and len(micro) == 1 and k_min == 1 and not shared:
            stats = micro[0].stats
            if stats.milp_bound_ms is not None and stats.milp_exact:
                split = bound - k_min * self.cost.beta_ms + 2 * self.cost.beta_ms
                # a solver reports its bound to its own tolerance (CBC: 5 digits): never above the plan
                proven = min(stats.milp_bound_ms, micro[0].predicted_ms)
                bound = max(bound, min(proven, split))
        return bound
