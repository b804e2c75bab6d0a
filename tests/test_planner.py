"""The adaptive planner: valid plans on random batches, optimality against brute force on
tiny clusters, micro-batching under memory pressure, and clear errors for bad batches."""
from __future__ import annotations

import itertools
import json
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pliant.planner import Plan, PlanningError, SequenceTooLongError, baselines, plan_problems, validate_plan
from pliant.planner.milp import highs_available

from conftest import small_planner

SOLVERS = ["cbc"] + (["highs"] if highs_available() else [])


def _check(plan: Plan, planner) -> None:
    validate_plan(plan, planner.cost, planner.sizes)
    assert plan.predicted_ms >= plan.lower_bound_ms * (1 - 1e-12)
    for mb in plan.micro_batches:
        # the MILP's answer is kept only when it beats the heuristic's
        assert mb.predicted_ms <= mb.stats.heuristic_ms + 1e-9
        if mb.stats.source == "milp":
            assert mb.stats.milp_ms == pytest.approx(mb.predicted_ms)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    nodes=st.integers(1, 3),
    per_node=st.sampled_from([1, 2, 4]),
    memory=st.sampled_from([0.25, 0.5, 4.0]),
    power_of_two=st.booleans(),
    attention=st.sampled_from([("softmax",), ("linear", "linear", "linear", "softmax"), ("linear",)]),
    lengths=st.lists(st.integers(1, 9000), min_size=1, max_size=40),
)
def test_every_plan_is_valid(nodes, per_node, memory, power_of_two, attention, lengths):
    planner = small_planner(nodes, per_node, memory, time_limit_s=0.3, power_of_two=power_of_two,
                            attention=attention)
    try:
        planner.check_lengths(lengths)
    except SequenceTooLongError:
        assume(False)
    plan = planner.plan(lengths)
    _check(plan, planner)
    # every plan round-trips through strict JSON (RFC 8259: no Infinity or NaN)
    text = plan.to_json()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert Plan.from_json(text) == plan
    if power_of_two:
        assert all(g.size & (g.size - 1) == 0 for mb in plan.micro_batches for g in mb.groups)
    # adaptive is never worse than any single degree it may use (BatchAda over its sizes)
    for s in planner.fixed_degrees():
        if s in planner.sizes:
            fixed = planner.plan_fixed(lengths, s)
            if fixed is not None:
                validate_plan(fixed, planner.cost)
                assert plan.predicted_ms <= fixed.predicted_ms * (1 + 1e-9)


def _brute_force(planner, lengths) -> float:
    """Optimal single-micro-batch makespan on one node: every multiset of group sizes, every assignment."""
    cost, n_dev = planner.cost, planner.cost.world_size
    lengths = np.asarray(lengths)
    best = np.inf

    def mixes(left, largest):
        if left == 0:
            yield []
            return
        for s in range(min(left, largest), 0, -1):
            if s in planner.sizes:
                for rest in mixes(left - s, s):
                    yield [s] + rest

    for mix in mixes(n_dev, n_dev):
        times = np.array([[cost.seq_ms(np.array([L]), s)[0] for s in mix] for L in lengths])
        for assign in itertools.product(range(len(mix)), repeat=len(lengths)):
            load = np.zeros(len(mix))
            tokens = np.zeros(len(mix))
            count = np.zeros(len(mix), dtype=int)
            for j, g in enumerate(assign):
                load[g] += times[j, g]
                tokens[g] += cost.padded(np.array([lengths[j]]), mix[g])[0]
                count[g] += 1
            if all(count[g] == 0 or cost.fits(tokens[g], count[g], mix[g]) for g in range(len(mix))):
                busy = load[count > 0]
                best = min(best, cost.beta_ms + busy.max())
    return best


def _set_partitions(items: list[int]):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _set_partitions(rest):
        for i in range(len(part)):
            yield part[:i] + [[first] + part[i]] + part[i + 1:]
        yield [[first]] + part


def _brute_force_split(planner, lengths) -> tuple[float, int]:
    """Optimal plan over every split into micro-batches (each optimal by _brute_force): its
    time and its micro-batch count."""
    lengths = np.asarray(lengths)
    best, count, memo = np.inf, 0, {}
    for part in _set_partitions(list(range(len(lengths)))):
        total = 0.0
        for mb in part:
            key = tuple(sorted(lengths[mb].tolist()))
            if key not in memo:
                memo[key] = _brute_force(planner, lengths[mb])
            total += memo[key]
            if total >= best:
                break
        if total < best:
            best, count = total, len(part)
    return best, count


@pytest.mark.parametrize("seed", range(10))
def test_the_bound_never_exceeds_the_optimum_when_memory_splits_the_batch(seed):
    """With memory forcing two or three micro-batches, the cost model's bound (the divisible LP,
    raised by the memory term: the longest micro-batch holds only a memory's worth of work) is
    never above the optimum over every split, found by brute force; it prints how tight it is."""
    from pliant.planner.blaster import min_micro_batches
    from pliant.planner.cost import divisible_bound

    rng = np.random.default_rng(seed)
    lengths = rng.integers(300, 2500, size=int(rng.integers(5, 7)))
    lengths[0] = int(rng.integers(2500, 4000))
    planner = small_planner(1, 4, memory_gib=float(rng.choice([0.2, 0.25, 0.3])), time_limit_s=5.0,
                            solver="heuristic")
    try:
        planner.check_lengths(lengths)
    except SequenceTooLongError:
        pytest.skip("the long sequence fits no group at this memory")
    cost = planner.cost
    k = min_micro_batches(lengths, cost)
    optimum, count = _brute_force_split(planner, lengths)
    assert np.isfinite(optimum) and count >= k >= 2, (k, count)
    bound = cost.lower_bound_ms(lengths, planner.sizes, k)
    t = np.stack([np.where(cost.seq_fits(lengths, s), cost.seq_ms(lengths, s), np.inf) for s in planner.sizes], 1)
    divisible = k * cost.beta_ms + divisible_bound(t, t * np.asarray(planner.sizes)[None, :], cost.world_size)
    print(f"seed {seed}: {len(lengths)} sequences, at least {k} micro-batches (optimum {count}): bound / optimum "
          f"{bound / optimum:.3f} (the divisible LP alone {divisible / optimum:.3f})")
    assert divisible <= bound * (1 + 1e-12) and bound <= optimum * (1 + 1e-9)
    assert planner.plan(lengths).predicted_ms >= optimum * (1 - 1e-9)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("seed", range(6))
def test_milp_matches_brute_force_optimum(solver, seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(200, 6000, size=int(rng.integers(3, 7)))
    lengths[0] = int(rng.integers(4000, 9000))  # one long sequence, so mixed groups pay off
    planner = small_planner(1, 4, memory_gib=2.0, time_limit_s=20.0, solver=solver, mip_gap=0.0)
    optimum = _brute_force(planner, lengths)
    assert np.isfinite(optimum)
    plan = planner.plan(lengths)
    _check(plan, planner)
    mb = plan.micro_batches[0]
    assert len(plan.micro_batches) == 1
    assert mb.stats.status == "optimal"
    # every sequence is placed individually (n <= max_long), so the MILP is exact
    assert plan.predicted_ms <= optimum * (1 + 1e-6)
    assert plan.predicted_ms >= optimum * (1 - 1e-9)
    assert mb.stats.heuristic_ms >= optimum * (1 - 1e-9)
    # the bound: the MILP's, proven optimal over the whole batch, equals the optimum; the cost
    # model's own (the divisible LP) is below it
    assert plan.lower_bound_ms == pytest.approx(optimum, rel=1e-6)
    assert plan.lower_bound_ms <= plan.predicted_ms
    assert planner.cost.lower_bound_ms(lengths, planner.sizes) <= optimum * (1 + 1e-12)


def test_mixed_group_sizes_for_a_long_tail_batch():
    planner = small_planner(2, 4, memory_gib=1.0, time_limit_s=1.0)
    lengths = [6000, 2500, 2000] + [1200, 900, 800, 700, 600, 500, 400, 400, 300, 300, 200, 200, 100] * 2
    plan = planner.plan(lengths)
    _check(plan, planner)
    sizes = {g.size for g in plan.micro_batches[0].groups if g.seq_ids}
    assert len(sizes) >= 2 and 1 in sizes, sizes
    base = baselines(planner, lengths, max_len=8000)
    assert plan.predicted_ms < base.static_ms and plan.predicted_ms <= base.batchada_ms * (1 + 1e-9)


def test_memory_pressure_splits_into_micro_batches():
    planner = small_planner(2, 4, memory_gib=0.25, time_limit_s=1.0)
    lengths = [9000, 3000, 2500, 2400, 2300, 2200, 2100, 2500, 1200, 800, 700, 600]
    plan = planner.plan(lengths)
    _check(plan, planner)
    assert len(plan.micro_batches) >= 3  # 31K tokens; 8 devices hold about 10.7K at a time
    assert all(plan.micro_batch_candidates.get(k) is None for k in (1, 2))


@pytest.mark.parametrize("solver", SOLVERS)
def test_node_boundaries_on_the_64_gpu_config(flexsp_cfg, solver):
    from pliant.planner import Planner, PlannerSpec, get_distribution, token_batches

    spec = PlannerSpec(solver=solver, time_limit_s=1.5)
    planner = Planner.from_specs(flexsp_cfg.cluster, flexsp_cfg.model, flexsp_cfg.cost, spec)
    assert planner.solver == solver
    for lengths in itertools.islice(token_batches(get_distribution("github"), 524_288, 196_608, 3), 2):
        t0 = time.perf_counter()
        plan = planner.plan(lengths)
        assert time.perf_counter() - t0 < planner.spec.time_limit_s + 5.0  # budget honoured (generous for CI)
        _check(plan, planner)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    nodes=st.integers(2, 3),
    per_node=st.sampled_from([6, 8]),
    memory=st.sampled_from([0.25, 0.5]),
    short=st.lists(st.integers(50, 3000), min_size=8, max_size=48),
    long=st.lists(st.integers(3000, 14000), min_size=1, max_size=4),
)
def test_more_sizes_never_plan_worse(nodes, per_node, memory, short, long):
    """Monotone by construction: the planner over all sizes also runs, unchanged, the search a
    power-of-two planner runs and every uniform degree's, so it is never worse than either.
    (The search is deterministic; the MILP, off here, only ever lowers a plan further.)"""
    lengths = long + short
    every = small_planner(nodes, per_node, memory, time_limit_s=30.0, solver="heuristic")
    pow2 = small_planner(nodes, per_node, memory, time_limit_s=30.0, solver="heuristic", power_of_two=True)
    try:
        every.check_lengths(lengths)
        pow2.check_lengths(lengths)
    except SequenceTooLongError:
        assume(False)
    plan = every.plan(lengths)
    _check(plan, every)
    assert plan.predicted_ms <= pow2.plan(lengths).predicted_ms * (1 + 1e-9)
    for s in every.fixed_degrees():
        fixed = every.plan_fixed(lengths, s)
        if fixed is not None:
            assert plan.predicted_ms <= fixed.predicted_ms * (1 + 1e-9)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    per_node=st.sampled_from([4, 8]),
    memory=st.sampled_from([0.25, 0.4]),
    short=st.lists(st.integers(50, 3000), min_size=8, max_size=40),
    long=st.lists(st.integers(3000, 9000), min_size=1, max_size=4),
)
def test_more_split_families_never_plan_worse(monkeypatch, per_node, memory, short, long):
    """The sorted cuts (FlexSP's split) come after min-max and snake, which keep the time they
    had alone: with them the plan is never worse than without. (monkeypatch's context is
    entered and left within each example.)"""
    from pliant.planner import blaster

    lengths = long + short
    planner = small_planner(2, per_node, memory, time_limit_s=30.0, solver="heuristic")
    try:
        planner.check_lengths(lengths)
    except SequenceTooLongError:
        assume(False)
    with_cuts = planner.plan(lengths)
    _check(with_cuts, planner)
    with monkeypatch.context() as m:
        m.setattr(blaster, "CUT_FRACTIONS", ())
        without = planner.plan(lengths)
    assert with_cuts.predicted_ms <= without.predicted_ms * (1 + 1e-9)


def test_the_sorted_cut_puts_the_longest_sequences_together():
    from pliant.planner.blaster import candidate_splits, split_cut

    planner = small_planner(2, 4, memory_gib=0.25, time_limit_s=1.0)
    lengths = np.array([9000, 300, 3000, 200, 2500, 100, 2400, 800, 700, 600])
    parts = split_cut(lengths, 3, planner.cost, 0.35)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(lengths)))
    first = lengths[parts[0]]
    assert first.min() >= max(lengths[p].max() for p in parts[1:])  # contiguous in length order
    names = [n for n, _ in candidate_splits(lengths, 3, planner.cost)]
    assert names[:2] == ["min-max", "snake"] and any(n.startswith("cut-") for n in names[2:])


def test_plan_json_round_trip(tmp_path):
    planner = small_planner(2, 4)
    plan = planner.plan([5000, 300, 200, 100, 2000])
    plan.to_json(tmp_path / "plan.json")
    back = Plan.from_json((tmp_path / "plan.json").read_text())
    assert back == plan
    assert plan_problems(back, planner.cost, planner.sizes) == []
    # strict JSON: a figure the solver could not give (an unbounded MILP bound) is null, not Infinity
    plan.micro_batches[0].stats.milp_bound_ms = float("inf")
    text = plan.to_json()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert Plan.from_json(text).micro_batches[0].stats.milp_bound_ms is None


def test_validator_catches_broken_plans():
    planner = small_planner(2, 4)
    plan = planner.plan([5000, 300, 200, 100, 2000])
    broken = Plan.from_dict(plan.to_dict())
    g = next(g for g in broken.micro_batches[0].groups if g.seq_ids)
    g.seq_ids = g.seq_ids + [g.seq_ids[0]]  # a sequence twice
    problems = plan_problems(broken, planner.cost)
    assert any("planned" in p for p in problems) and any("tokens" in p for p in problems)
    broken = Plan.from_dict(plan.to_dict())
    broken.micro_batches[0].groups.pop()  # a rank uncovered
    assert any("covered" in p for p in plan_problems(broken, planner.cost))


def test_bad_batches_get_clear_errors():
    planner = small_planner(2, 4, memory_gib=0.25)
    longest, size = planner.longest_supported()
    assert size == 8 and longest > 0
    with pytest.raises(SequenceTooLongError) as e:
        planner.plan([100, longest + 1, 50])
    msg = str(e.value)
    assert f"{longest + 1} tokens" in msg and f"{longest} tokens" in msg and "group of 8" in msg
    assert e.value.seq_id == 1
    planner.plan([100, longest, 50])  # the longest supported one does plan
    with pytest.raises(PlanningError, match="empty"):
        planner.plan([])
    with pytest.raises(PlanningError, match="positive"):
        planner.plan([10, 0])
    with pytest.raises(PlanningError, match="integers"):
        planner.plan([10.5])


def test_zero_device_cluster_is_rejected():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="nodes"):
        small_planner(nodes=0)


def test_solver_choice_falls_back_to_cbc(monkeypatch):
    from pliant.planner import milp

    monkeypatch.setattr(milp, "highs_available", lambda: False)
    assert milp.pick_solver("auto") == "cbc"
    with pytest.raises(PlanningError, match="highspy"):
        milp.pick_solver("highs")
    monkeypatch.setattr(milp, "highs_available", lambda: True)
    assert milp.pick_solver("auto") == "highs"
    assert milp.pick_solver("heuristic") == "heuristic"


def test_batch_adaptive_takes_the_uniform_degree_priced_fastest():
    """BatchAda (plan_for with BATCH_ADAPTIVE): one uniform degree for the whole batch, the one
    whose plan the cost model prices fastest; no degree when no uniform one holds the batch."""
    from pliant.planner.core import BATCH_ADAPTIVE

    planner = small_planner(1, 8, 40.0, time_limit_s=0.3)
    for lengths in ([4096, 300, 200, 100, 50, 2000, 900], [60000, 800, 700], [100] * 16):
        plan = planner.plan_for(lengths, BATCH_ADAPTIVE)
        fixed = {s: planner.plan_fixed(lengths, s) for s in planner.fixed_degrees()}
        priced = {s: p.predicted_ms for s, p in fixed.items() if p is not None}
        validate_plan(plan, planner.cost)
        assert len({g.size for mb in plan.micro_batches for g in mb.groups}) == 1
        assert plan.predicted_ms == pytest.approx(min(priced.values()))
        assert plan.strategy == f"fixed-{min(priced, key=priced.get)}"
        assert planner.plan(lengths).predicted_ms <= plan.predicted_ms * (1 + 1e-9)


def test_longest_fits_takes_the_smallest_degree_that_holds_the_longest_sequence():
    """plan_for with LONGEST_FITS (verl's and Megatron's dynamic CP): every group of the
    smallest uniform degree that holds the batch's longest sequence, whatever the rest; None
    when no degree holds it."""
    from pliant.planner.core import LONGEST_FITS

    planner = small_planner(1, 8, 40.0, time_limit_s=0.3)
    for lengths in ([4096, 300, 200, 100, 50, 2000, 900], [60000, 800, 700], [100] * 16):
        arr = np.asarray(lengths)
        want = next(s for s in planner.fixed_degrees() if planner.cost.seq_fits(arr[[arr.argmax()]], s)[0])
        plan = planner.plan_for(lengths, LONGEST_FITS)
        validate_plan(plan, planner.cost)
        assert {g.size for mb in plan.micro_batches for g in mb.groups} == {want}
        assert plan.strategy == f"fixed-{want}"
        assert planner.plan(lengths).predicted_ms <= plan.predicted_ms * (1 + 1e-9)
    longest, _ = planner.longest_supported()
    assert planner.plan_for([longest + 1, 10], LONGEST_FITS) is None
