"""The planner's local steps, checked by enumeration: the local search stops only where no move,
swap or exchange of up to two sequences a side lowers the makespan, and the SP-group
rearrangements keep every sequence, every cap and the device count they promise."""
from __future__ import annotations

import itertools
import time

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pliant.planner.heuristic import merges
from pliant.planner.schedule import SeqTable, WorkGroup, improve, priced_ms

from conftest import small_planner


def _table(planner, lengths) -> SeqTable:
    arr = np.asarray(lengths, dtype=np.int64)
    return SeqTable.build(planner.cost, arr, np.arange(len(arr)), planner.sizes)


def _groups(table: SeqTable, sizes: list[int], owner: list[int]) -> list[WorkGroup]:
    groups = [WorkGroup(s, table.col[s]) for s in sizes]
    for j, g in enumerate(owner):
        groups[g].add(j, table)
    return groups


def _fits(table: SeqTable, g: WorkGroup) -> bool:
    return bool(np.isfinite(table.t[g.seqs, g.col]).all() and table.mem[g.seqs, g.col].sum() <= table.room)


def _assert_consistent(groups: list[WorkGroup], table: SeqTable, cost, before_ms: float) -> None:
    """Every sequence placed once, loads and memory the table's sums, every group within its
    memory, and the makespan no higher than before."""
    assert sorted(j for g in groups for j in g.seqs) == list(range(len(table)))
    for g in groups:
        assert _fits(table, g)
        assert abs(g.load - table.t[g.seqs, g.col].sum()) < 1e-6
        assert abs(g.used - table.mem[g.seqs, g.col].sum()) <= 1e-9 * table.room
    assert priced_ms(groups, cost) <= before_ms + 1e-9


def _subsets(seqs: list[int]):
    for r in range(3):
        yield from itertools.combinations(seqs, r)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.sampled_from([1, 1, 1, 2]), min_size=2, max_size=5),
    lengths=st.lists(st.integers(20, 2500), min_size=3, max_size=24),
    seed=st.integers(0, 2**16),
)
def test_improve_stops_only_where_no_exchange_helps(sizes, lengths, seed):
    planner = small_planner(1, 8, memory_gib=4.0)
    table = _table(planner, lengths)
    rng = np.random.default_rng(seed)
    owner = rng.integers(0, len(sizes), size=len(lengths)).tolist()
    groups = _groups(table, sizes, owner)
    assume(all(_fits(table, g) for g in groups))
    before = priced_ms(groups, planner.cost)
    improve(groups, table, planner.cost, time.perf_counter() + 60.0, max_iter=10_000)

    _assert_consistent(groups, table, planner.cost, before)

    # local optimality, enumerated: every group is a partner here (at most 4 others) and every
    # sequence is among its group's quickest (at most 24 in all, fewer than `few` per group)
    loads = [g.load for g in groups]
    crit = int(np.argmax(loads))
    a = groups[crit]
    assume(len(a.seqs) <= 12 and all(len(g.seqs) <= 12 for g in groups))
    for hi, b in enumerate(groups):
        if hi == crit:
            continue
        for out_a in _subsets(a.seqs):
            for out_b in _subsets(b.seqs):
                if not out_a and not out_b:
                    continue
                new_a = [j for j in a.seqs if j not in out_a] + list(out_b)
                new_b = [k for k in b.seqs if k not in out_b] + list(out_a)
                load_a = table.t[new_a, a.col].sum()
                load_b = table.t[new_b, b.col].sum()
                if not (np.isfinite(load_a) and np.isfinite(load_b)):
                    continue
                if table.mem[new_a, a.col].sum() > table.room or table.mem[new_b, b.col].sum() > table.room:
                    continue
                assert max(load_a, load_b) >= loads[crit] - 1e-6, (out_a, out_b)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(1, 8), min_size=2, max_size=30),
    lengths=st.lists(st.integers(20, 6000), min_size=30, max_size=90),
    memory=st.sampled_from([0.06, 0.1, 4.0]),
    seed=st.integers(0, 2**16),
)
def test_improve_keeps_a_large_schedule_consistent(sizes, lengths, memory, seed):
    """Groups of more than `few` sequences, more than `partners` others, SP groups of one size
    as partners, and memory that binds: every sequence stays placed once, loads and memory
    stay the table's sums, no group passes its memory, and the makespan never rises."""
    planner = small_planner(2, 8, memory_gib=memory)
    table = _table(planner, lengths)
    sizes = [s for s in sizes if s in table.col]
    assume(len(sizes) >= 2)
    rng = np.random.default_rng(seed)
    groups = [WorkGroup(s, table.col[s]) for s in sizes]
    for j in rng.permutation(len(lengths)).tolist():  # each sequence to a random group that holds it
        fits = [g for g in groups if g.can_hold(j, table, planner.cost)]
        assume(fits)
        fits[int(rng.integers(len(fits)))].add(j, table)
    before = priced_ms(groups, planner.cost)
    improve(groups, table, planner.cost, time.perf_counter() + 60.0, max_iter=2_000)
    _assert_consistent(groups, table, planner.cost, before)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.sampled_from([2, 4]),
    long=st.lists(st.integers(2000, 12000), min_size=2, max_size=4),
    short=st.lists(st.integers(50, 3000), min_size=4, max_size=30),
    slack=st.floats(1.0, 2.5),
)
def test_merges_keep_every_sequence_on_fewer_devices(size, long, short, slack):
    planner = small_planner(2, 8, memory_gib=1.0, solver="heuristic")
    cost = planner.cost
    table = _table(planner, long + short)
    # one SP group of `size` per long sequence, each also holding a short one where that fits
    sp = []
    for j in range(len(long)):
        g = WorkGroup(size, table.col[size])
        assume(g.can_hold(j, table, cost))
        g.add(j, table)
        k = len(long) + j
        if k < len(table) and g.can_hold(k, table, cost):
            g.add(k, table)
        sp.append(g)
    cap = max(g.load for g in sp) * slack
    devices = sum(g.size for g in sp)
    in_sp = sorted(j for g in sp for j in g.seqs)
    configs = merges(table, cost, sp, cap)
    for config in configs:
        assert sum(g.size for g in config) < devices
        placed = [j for g in config for j in g.seqs]
        assert len(placed) == len(set(placed))
        assert set(placed) <= set(in_sp)
        for g in config:
            assert abs(g.load - table.t[g.seqs, g.col].sum()) < 1e-6
            if any(g is x for x in sp):
                continue  # kept as it was
            assert g.load <= cap + 1e-9 and _fits(table, g)
        # a sequence the rearrangement took out of the SP groups finishes alone on one device within the cap
        for j in set(in_sp) - set(placed):
            assert table.t[j, table.col[1]] <= cap + 1e-9
