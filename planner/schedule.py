"""Working state shared by the solvers: per-sequence cost tables, groups under construction,
local search, and the conversion of a finished schedule into a `MicroBatchPlan`."""
from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import numpy as np

from .cost import CostModel, memory_bound
from .layout import free_ranks, place_groups
from .plan import GroupPlan, MicroBatchPlan, SolverStats


@dataclass
class SeqTable:
    """Costs of every sequence of a micro-batch in every allowed group size."""

    lengths: np.ndarray  # int64, local order
    ids: np.ndarray  # the sequences' ids in the global batch
    sizes: list[int]
    t: np.ndarray  # [n, m] ms per sequence; inf where the sequence alone does not fit
    pad: np.ndarray  # [n, m] padded tokens
    col: dict[int, int]  # size -> column
    mem: np.ndarray  # [n, m] bytes each sequence adds to a device of its group (per padded token, per sequence)
    room: float  # bytes a device has for sequences: usable memory minus model states, less a rounding margin
    world: int  # devices in the cluster

    # rows as lists, for fast scalar reads in the inner loops; each row is made on first use
    # (at 1024 GPUs a table has 135 sizes, and most rows are only read through numpy)
    @cached_property
    def t_rows(self) -> "_Rows":
        return _Rows(self.t)

    @cached_property
    def mem_rows(self) -> "_Rows":
        return _Rows(self.mem)

    @cached_property
    def t_pad(self) -> np.ndarray:
        """t with a row of zeros appended: index -1 reads as no sequence."""
        return np.vstack([self.t, np.zeros((1, self.t.shape[1]))])

    @cached_property
    def mem_pad(self) -> np.ndarray:
        return np.vstack([self.mem, np.zeros((1, self.mem.shape[1]))])

    @cached_property
    def order(self) -> np.ndarray:
        """Rows, longest sequence first."""
        return np.argsort(-self.lengths, kind="stable")

    @cached_property
    def bound_ms(self) -> float:
        """The cost model's bound (CostModel.lower_bound_ms) for these sequences with these
        sizes, less k beta: the divisible LP's optimum, raised by the memory term where the
        sequences do not fit the devices' memory at once (cost.py `memory_bound`); the table
        already holds every t_js and each sequence's bytes."""
        sizes = np.asarray(self.sizes, dtype=np.float64)[None, :]
        mem = np.where(np.isfinite(self.t), self.mem * sizes, np.inf).min(axis=1)
        return memory_bound(self.t, self.t * sizes, self.world, mem, self.room)

    @classmethod
    def build(cls, cost: CostModel, lengths: np.ndarray, ids: np.ndarray, sizes: list[int]) -> "SeqTable":
        lengths = np.asarray(lengths, dtype=np.int64)
        n, m = len(lengths), len(sizes)
        t = np.empty((n, m))
        pad = np.empty((n, m))
        mem = np.empty((n, m))
        for c, s in enumerate(sizes):
            pad[:, c] = cost.padded(lengths, s)
            t[:, c] = np.where(cost.seq_fits(lengths, s), cost.seq_ms(lengths, s), np.inf)
            _, per_token, per_seq = cost.memory_coeffs(s)
            mem[:, c] = per_token * pad[:, c] + per_seq
        room = (cost.device_memory_bytes - cost.model_state_bytes) * (1 - 1e-12)
        return cls(lengths, np.asarray(ids, dtype=np.int64), list(sizes), t, pad, {s: c for c, s in enumerate(sizes)},
                   mem, room, cost.world_size)

    def __len__(self) -> int:
        return len(self.lengths)

    def restrict(self, sizes: list[int]) -> "SeqTable":
        """The same sequences with only some of the group sizes."""
        cols = [self.col[s] for s in sizes]
        return SeqTable(self.lengths, self.ids, list(sizes), self.t[:, cols], self.pad[:, cols],
                        {s: c for c, s in enumerate(sizes)}, self.mem[:, cols], self.room, self.world)

    def subset(self, rows: np.ndarray) -> "SeqTable":
        """The table of some of these sequences (rows in this table's order)."""
        return SeqTable(self.lengths[rows], self.ids[rows], self.sizes, self.t[rows], self.pad[rows], self.col,
                        self.mem[rows], self.room, self.world)


class _Rows:
    """row j of a 2-D array as a list, converted when first read."""

    def __init__(self, a: np.ndarray):
        self._a = a
        self._rows: dict[int, list[float]] = {}

    def __getitem__(self, j: int) -> list[float]:
        row = self._rows.get(j)
        if row is None:
            row = self._rows[j] = self._a[j].tolist()
        return row


@dataclass
class WorkGroup:
    size: int
    col: int
    seqs: list[int] = field(default_factory=list)  # local sequence indices
    load: float = 0.0  # ms, without beta
    used: float = 0.0  # bytes its sequences take on each device (SeqTable.mem summed)

    def can_hold(self, j: int, table: SeqTable, cost: CostModel) -> bool:
        """Whether sequence j also fits (one comparison: the planner asks this in every inner loop)."""
        return table.t_rows[j][self.col] != np.inf and self.used + table.mem_rows[j][self.col] <= table.room

    def add(self, j: int, table: SeqTable) -> None:
        self.seqs.append(j)
        self.load += table.t_rows[j][self.col]
        self.used += table.mem_rows[j][self.col]

    def remove(self, j: int, table: SeqTable) -> None:
        self.seqs.remove(j)
        self.load -= table.t_rows[j][self.col]
        self.used -= table.mem_rows[j][self.col]
        if not self.seqs:
            self.load, self.used = 0.0, 0.0


def priced_ms(groups: list[WorkGroup], cost: CostModel) -> float:
    """A schedule's micro-batch time as the plan will state it: the makespan on dedicated
    devices; on shared CPU cores, the cost model's shared-core price."""
    return cost.micro_batch_ms([(g.size, cost.beta_ms + g.load) for g in groups if g.seqs])


def new_groups(table: SeqTable, sizes: list[int]) -> list[WorkGroup]:
    return [WorkGroup(s, table.col[s]) for s in sizes]


def list_schedule(seqs: list[int], groups: list[WorkGroup], table: SeqTable, cost: CostModel) -> bool:
    """Give each sequence, longest first, to the group where it finishes earliest (memory
    permitting). Groups of the same size are kept in a heap by load. False if some
    sequence fits nowhere.

    The planner runs this in its inner loop, so it reads plain lists and asks a group's
    memory only when that group would beat the best finish found so far."""
    heaps: dict[int, list[tuple[float, int]]] = {}
    for gi, g in enumerate(groups):
        heaps.setdefault(g.col, []).append((g.load, gi))
    for h in heaps.values():
        heapq.heapify(h)
    cols = list(heaps)
    classes = list(enumerate(heaps.values()))  # (position among the present sizes, heap)
    order = np.asarray(seqs, dtype=np.int64)
    order = order[np.argsort(-table.lengths[order], kind="stable")]
    # only the present sizes' columns, as lists: cheap scalar reads without converting the whole table
    t_rows = table.t[order][:, cols].tolist()
    mem_rows = table.mem[order][:, cols].tolist()
    room = table.room
    inf = np.inf
    for j, rt, rm in zip(order.tolist(), t_rows, mem_rows):
        best, best_c = inf, -1
        skipped: list[tuple[int, tuple[float, int]]] = []
        for c, heap in classes:
            if not heap:
                continue
            fin = heap[0][0] + rt[c]
            if fin >= best:  # also where j does not fit this size (inf)
                continue
            need = rm[c]
            while heap and groups[heap[0][1]].used + need > room:
                skipped.append((c, heapq.heappop(heap)))
            if heap:
                fin = heap[0][0] + rt[c]
                if fin < best:
                    best, best_c = fin, c
        if best_c >= 0:
            heap = classes[best_c][1]
            g = groups[heap[0][1]]
            g.seqs.append(j)
            g.load += rt[best_c]
            g.used += rm[best_c]
            heapq.heapreplace(heap, (g.load, heap[0][1]))
        for c, item in skipped:
            heapq.heappush(classes[c][1], item)
        if best_c < 0:
            return False
    return True


def improve(groups: list[WorkGroup], table: SeqTable, cost: CostModel, deadline: float,
            max_iter: int = 400, exchange: bool = True, partners: int = 4, few: int = 12) -> None:
    """Local search on the makespan: while it lowers the larger of the two groups' loads, move
    one sequence off the most loaded group, or swap one of its sequences with one of another
    group, or exchange up to two of its sequences for up to two of a partner's: one of the
    `partners` least loaded groups, or an SP group of its size. The exchange balances groups
    whose spread is finer than any one sequence's time (groups of one filled with short
    sequences: a single move or swap overshoots); its pairs are drawn from each group's `few`
    quickest sequences; `exchange=False` leaves it out (a cheaper first pass)."""
    if not groups:
        return
    cols = np.array([g.col for g in groups])
    owner = np.full(len(table), -1)
    for gi, g in enumerate(groups):
        owner[g.seqs] = gi
    for _ in range(max_iter):
        if time.perf_counter() > deadline:
            return
        loads = np.array([g.load if g.seqs else 0.0 for g in groups])
        gi = int(np.argmax(loads))
        if not groups[gi].seqs:
            return
        moved = (_best_move(groups, gi, loads, cols, table, cost)
                 or _best_swap(groups, gi, loads, cols, owner, table, cost)
                 or (exchange and _best_exchange(groups, gi, loads, partners, few, table, cost)))
        if not moved:
            return
        for hi in moved:
            owner[groups[hi].seqs] = hi


def _ascending(flat: np.ndarray, first: int = 8, most: int = 256):
    """Indices of the `most` smallest values of `flat`, smallest first: the `first` few from a
    partial sort, the rest (read only when memory turned all of those down) from a second one."""
    for k in (first, most):
        if flat.size <= k:
            yield from np.argsort(flat, kind="stable")[first if k == most else 0:].tolist()
            return
        top = np.argpartition(flat, k - 1)[:k]
        top = top[np.argsort(flat[top], kind="stable")]
        yield from (top[first:] if k == most else top).tolist()


def _best_move(groups, gi, loads, cols, table, cost) -> tuple[int, int] | None:
    """Best move of one sequence of the critical group to another group."""
    crit, peak = groups[gi], loads[gi]
    js = np.array(crit.seqs)
    left = peak - table.t[js, crit.col]
    new_peak = np.maximum(loads[None, :] + table.t[js][:, cols], left[:, None])  # inf where j does not fit
    new_peak[:, gi] = np.inf
    flat = new_peak.ravel()
    for f in _ascending(flat):
        if not flat[f] < peak - 1e-9:
            return None
        a, hi = np.unravel_index(f, new_peak.shape)
        j, h = int(js[a]), groups[int(hi)]
        if h.can_hold(j, table, cost):
            crit.remove(j, table)
            h.add(j, table)
            return gi, int(hi)
    return None


def _best_swap(groups, gi, loads, cols, owner, table, cost) -> tuple[int, int] | None:
    """Best exchange of one sequence of the critical group with one of another group."""
    crit, peak = groups[gi], loads[gi]
    ks = np.flatnonzero((owner >= 0) & (owner != gi))
    if not len(ks) or not crit.seqs:
        return None
    hs = owner[ks]
    js = np.array(crit.seqs)
    h_cols = cols[hs]
    # new loads of the critical group and of the partner group, for every (j, k) pair
    new_crit = peak - table.t[js, crit.col][:, None] + table.t[ks, crit.col][None, :]
    new_h = (loads[hs] - table.t[ks, h_cols])[None, :] + table.t[js[:, None], h_cols[None, :]]
    worst = np.maximum(new_crit, new_h)  # inf where a sequence does not fit the other size
    flat = worst.ravel()
    for f in _ascending(flat):
        a, b = np.unravel_index(f, worst.shape)
        if not worst[a, b] < peak - 1e-9:
            return None
        j, k, hi = int(js[a]), int(ks[b]), int(hs[b])
        h = groups[hi]
        crit.remove(j, table)
        h.remove(k, table)
        if crit.can_hold(k, table, cost) and h.can_hold(j, table, cost):
            crit.add(k, table)
            h.add(j, table)
            return gi, hi
        crit.add(j, table)
        h.add(k, table)
    return None


@lru_cache(maxsize=64)
def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(n, 1)


def _subsets(seqs: list[int], table: SeqTable, col: int, few: int) -> np.ndarray:
    """[k, 2] rows of a group's subsets of at most two of its `few` quickest sequences (-1: none),
    the empty subset first."""
    js = np.asarray(seqs)
    if len(js) > few:
        js = js[np.argpartition(table.t[js, col], few - 1)[:few]]
    a, b = _pairs(len(js))
    first = np.concatenate([[-1], js, js[a]])
    second = np.concatenate([[-1], np.full(len(js), -1), js[b]])
    return np.stack([first, second], axis=1)


def _sums(rows: np.ndarray, padded: np.ndarray, col: int) -> np.ndarray:
    """Per subset, the sum over its sequences of one column of a padded table (t_pad, mem_pad)."""
    return padded[rows[:, 0], col] + padded[rows[:, 1], col]


def _best_exchange(groups, gi, loads, partners, few, table, cost) -> tuple[int, int] | None:
    """Best exchange of up to two sequences of the critical group with up to two of one partner
    group, memory permitting."""
    crit, peak = groups[gi], loads[gi]
    order = [int(h) for h in np.argsort(loads) if h != gi and groups[h].seqs]
    cand = order[:partners] + [h for h in order[partners:] if groups[h].size == crit.size > 1]
    if not cand:
        return None
    sa = _subsets(crit.seqs, table, crit.col, few)
    best = (peak - 1e-9, None)
    for hi in cand:
        h = groups[hi]
        sb = _subsets(h.seqs, table, h.col, few)
        t, mem, ca, cb = table.t_pad, table.mem_pad, crit.col, h.col
        new_a = peak - _sums(sa, t, ca)[:, None] + _sums(sb, t, ca)[None, :]
        new_b = loads[hi] - _sums(sb, t, cb)[None, :] + _sums(sa, t, cb)[:, None]
        worst = np.maximum(new_a, new_b)
        fits = ((crit.used - _sums(sa, mem, ca)[:, None] + _sums(sb, mem, ca)[None, :] <= table.room)
                & (h.used - _sums(sb, mem, cb)[None, :] + _sums(sa, mem, cb)[:, None] <= table.room))
        worst[~fits] = np.inf  # also nan-free: inf - inf cannot occur, a group's own sequences fit it
        worst[0, 0] = np.inf
        x, y = np.unravel_index(np.argmin(worst), worst.shape)
        if worst[x, y] < best[0]:
            best = (float(worst[x, y]), (hi, sa[x], sb[y]))
    if best[1] is None:
        return None
    hi, out_a, out_b = best[1]
    h = groups[hi]
    out_a, out_b = [int(j) for j in out_a if j >= 0], [int(k) for k in out_b if k >= 0]
    for j in out_a:
        crit.remove(j, table)
    for k in out_b:
        h.remove(k, table)
    for k in out_b:
        crit.add(k, table)
    for j in out_a:
        h.add(j, table)
    return gi, hi


def to_micro_batch(groups: list[WorkGroup], table: SeqTable, cost: CostModel, stats: SolverStats
                   ) -> MicroBatchPlan | None:
    """Place the non-idle groups on ranks, cover the free ranks with idle groups of one, and
    price every group exactly. None if the groups do not fit the cluster's nodes."""
    busy = [g for g in groups if g.seqs]
    world, per_node = cost.world_size, cost.devices_per_node
    sizes = [g.size for g in busy]
    if sum(sizes) > world:
        return None
    starts = place_groups(sizes, world, per_node)
    if starts is None:
        return None
    plans: list[GroupPlan] = []
    for g, st in zip(busy, starts):
        seqs = sorted(g.seqs, key=lambda j: int(table.ids[j]))
        lengths = table.lengths[seqs]
        tokens_pad = float(cost.padded(lengths, g.size).sum())
        ms = cost.group_ms(lengths, g.size)
        form = cost.sp_form(g.size, lengths)
        plans.append(GroupPlan(
            start=st, size=g.size, seq_ids=[int(table.ids[j]) for j in seqs], tokens=int(lengths.sum()),
            predicted_ms=ms, peak_memory_bytes=cost.group_memory_bytes(tokens_pad, len(seqs), g.size),
            softmax_sp=form.softmax, linear_sp=form.linear,
        ))
    for r in free_ranks(starts, sizes, world):
        plans.append(GroupPlan(start=r, size=1, seq_ids=[], tokens=0, predicted_ms=0.0,
                               peak_memory_bytes=cost.model_state_bytes, softmax_sp="none",
                               linear_sp="none"))
    plans.sort(key=lambda g: g.start)
    predicted = cost.micro_batch_ms([(g.size, g.predicted_ms) for g in plans if g.seq_ids])
    return MicroBatchPlan(groups=plans, predicted_ms=predicted, stats=stats)
