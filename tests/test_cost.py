"""The cost model, term by term, against numbers worked out by hand."""
from __future__ import annotations

import numpy as np
import pytest

from pliant.planner.cost import CostModel, model_state_bytes
from pliant.planner.spec import GIB, ModelSpec

from conftest import SMALL_COST, small_cluster, small_model


@pytest.fixture(scope="module")
def cost7b(flexsp_cfg) -> CostModel:
    return CostModel.from_specs(flexsp_cfg.cluster, flexsp_cfg.model, flexsp_cfg.cost, flexsp_cfg.planner)


def test_compute_matches_flexsp_form(cost7b):
    L = np.array([1000, 32768])
    for s in (1, 2, 8):
        pad = np.ceil(L / s) * s
        expect = (5.128e-6 * pad**2 + 0.184 * pad) / s
        np.testing.assert_allclose(cost7b.compute_ms(L, s), expect, rtol=1e-12)
    # padding to a multiple of the group size
    assert cost7b.padded(np.array([1001]), 8)[0] == 1008


def test_ulysses_volume_and_time(cost7b):
    # 7B: 32 layers, 32 q heads, 32 kv heads, head_dim 128, bf16, forward + backward
    L, s = np.array([65536]), 8
    per_token = (2 * 32 + 2 * 32) * 128 * 2
    expect_bytes = 2 * 32 * (65536 / s) * (s - 1) / s * per_token
    np.testing.assert_allclose(cost7b.softmax_comm_bytes(L, s), expect_bytes)
    np.testing.assert_allclose(cost7b.softmax_comm_ms(L, s), expect_bytes / 96.5e9 * 1e3)
    assert cost7b.uses_ulysses(8) and not cost7b.uses_ulysses(3)
    assert cost7b.softmax_comm_ms(L, 1)[0] == 0.0


def test_bandwidth_table_steps_up_to_next_size(cost7b):
    assert cost7b.a2a.gbps(2) == 119.5
    assert cost7b.a2a.gbps(3) == 104.0  # next tabulated size is 4
    assert cost7b.a2a.gbps(24) == 5.9  # next is 32
    assert cost7b.a2a.gbps(64) == 4.9


def test_lasp2h_used_when_heads_do_not_divide(cost7b):
    L, s = np.array([10000]), 3
    kv_bytes = 2 * 32 * 128 * 2
    expect = 2 * 32 * (np.ceil(10000 / 3) * 3 / 3) * (s - 1) * kv_bytes
    np.testing.assert_allclose(cost7b.softmax_comm_bytes(L, s), expect)


def test_hybrid_scales_quadratic_term_and_lasp2_volume_is_length_free():
    model = small_model(attention=("linear", "linear", "linear", "softmax"), layers=8)
    cost = CostModel.from_specs(small_cluster(), model, SMALL_COST)
    assert cost.n_linear == 6 and cost.n_softmax == 2
    assert cost.a1_ms == pytest.approx(SMALL_COST.a1_ms * 2 / 8)
    # LASP-2: per sequence, (s-1) states of heads x dk x dv float32 per linear layer, fwd + bwd
    state = 8 * 32 * 32 * 4
    assert cost.linear_comm_bytes(4) == 2 * 6 * 3 * state
    assert cost.linear_comm_bytes(1) == 0.0
    short, long = cost.seq_ms(np.array([64]), 4), cost.seq_ms(np.array([64_000]), 4)
    assert cost.linear_comm_ms(np.array([64]), 4)[0] > 0 and long > short
    all_linear = CostModel.from_specs(small_cluster(), small_model(attention=("linear",)), SMALL_COST)
    assert all_linear.a1_ms == 0.0 and all_linear.softmax_comm_ms(np.array([1000]), 4)[0] == 0.0


@pytest.mark.parametrize("stage, expect_per_param", [(0, 16.0), (1, 4 + 12 / 64), (2, 2 + 14 / 64), (3, 16 / 64)])
def test_zero_stage_model_states(stage, expect_per_param):
    assert model_state_bytes(1e9, 2, stage, 64) == pytest.approx(1e9 * expect_per_param)
    # full precision: no master copy; Adam m and v in the same dtype
    assert model_state_bytes(1e6, 4, 0, 1) == pytest.approx(1e6 * (4 + 4 + 8))


def test_memory_and_capacity(cost7b):
    states = 16 * 6.74e9 / 64
    assert cost7b.model_state_bytes == pytest.approx(states)
    assert cost7b.device_memory_bytes == 80 * GIB
    cap1 = (80 * GIB - states) / 4.48e6
    assert cost7b.token_capacity(1) == pytest.approx(cap1)
    assert cost7b.seq_fits(np.array([int(cap1)]), 1)[0]
    assert not cost7b.seq_fits(np.array([int(cap1) + 2]), 1)[0]
    assert cost7b.seq_fits(np.array([196608]), 16)[0] and not cost7b.seq_fits(np.array([196608]), 8)[0]
    mem = cost7b.group_memory_bytes(8000.0, 3, 8)
    assert mem == pytest.approx(states + 4.48e6 * 8000 / 8)


def test_lower_bound(cost7b):
    L = np.array([1000, 2000, 50_000])
    sizes = [1, 2, 4, 8, 16, 32, 64]
    single = 5.128e-6 * L.astype(float) ** 2 + 0.184 * L
    # short sequences: their least device-time is on one device, no communication
    per_seq = {s: [cost7b.seq_ms(np.array([x]), s)[0] if cost7b.seq_fits(np.array([x]), s)[0] else np.inf
                   for x in L] for s in sizes}
    device_time = [min(s * per_seq[s][j] for s in sizes) for j in range(3)]
    assert device_time[:2] == pytest.approx(single[:2])
    assert device_time[2] > single[2]  # 50K tokens do not fit one device: its least device-time communicates
    best = [min(per_seq[s][j] for s in sizes) for j in range(3)]
    spread, floor = sum(device_time) / 64, max(best)
    assert cost7b.lower_bound_ms(L, sizes) == pytest.approx(629.0 + max(spread, floor))
    # one very long sequence: its own best time is the bound, far above compute / N
    long = np.array([196_608])
    fastest = min(cost7b.seq_ms(long, s)[0] for s in sizes if cost7b.seq_fits(long, s)[0])
    assert cost7b.lower_bound_ms(long, sizes) == pytest.approx(629.0 + fastest)
    assert cost7b.lower_bound_ms(long, sizes) > 2 * (cost7b.single_device_ms(long)[0] / 64 + 629.0)
    # every further micro-batch pays the group overhead once more
    assert cost7b.lower_bound_ms(L, sizes, 3) == pytest.approx(cost7b.lower_bound_ms(L, sizes) + 2 * 629.0)


def gdn_model(**kw):
    """A Gated DeltaNet hybrid shaped like Qwen3-Next's linear layers, scaled down: more value
    heads than key heads, dk != dv, a 4-tap convolution."""
    spec = dict(name="gdn", layers=8, hidden=256, heads=8, kv_heads=2, head_dim=32, ffn_hidden=512, vocab_size=1000,
                attention=["linear", "linear", "linear", "softmax"], zero_stage=1, dtype="bf16",
                linear_kind="gated_delta", linear_heads=8, linear_key_heads=4, linear_key_dim=16,
                linear_value_dim=32, linear_conv=4)
    return ModelSpec(**{**spec, **kw})


def test_gated_delta_gather_volume_is_the_chunk_maps_and_length_free():
    cost = CostModel.from_specs(small_cluster(), gdn_model(linear_sp="lasp2"), SMALL_COST)
    Hv, dk, dv, s = 8, 16, 32, 4
    maps, grads = Hv * dk * (dk + dv) * 4, Hv * dk * dv * 4  # (A, B) forward; dS_in backward; float32
    halo = 3 * (2 * 4 * dk + Hv * dv) * 2  # kernel - 1 rows of q, k, v channels, bf16, forward and backward
    want = 6 * ((s - 1) * (maps + grads) + (s - 1) * halo * 2)
    got = cost.linear_comm_bytes(s, np.array([16, 4096, 65536]), "lasp2")
    np.testing.assert_allclose(got, want)
    assert cost.linear_state_bytes == maps
    # memory keeps every chunk's map per sequence per linear layer
    assert cost.memory_coeffs(s)[2] == 6 * s * maps


def test_gated_delta_form_chosen_per_group_heads_for_short_gather_for_long():
    cost = CostModel.from_specs(small_cluster(), gdn_model(), SMALL_COST)
    assert cost.linear_forms(4) == ("lasp2", "heads") and cost.linear_forms(1) == ("lasp2",)
    heads = cost.linear_comm_bytes(4, np.array([64, 4096, 65536]), "heads")
    assert heads[0] < heads[1] < heads[2]  # the all-to-all moves every token; the gather a fixed volume
    assert cost.sp_form(4, np.array([64] * 8)).linear == "heads"
    assert cost.sp_form(4, np.array([65536])).linear == "lasp2"
    assert cost.sp_form(4).linear == "lasp2"  # no lengths: LASP-2's form
    # pricing: each sequence at its best form; a group at its one form, never below the per-sequence bound
    mixed = np.array([64] * 8 + [65536])
    assert cost.group_ms(mixed, 4) >= cost.beta_ms + cost.seq_ms(mixed, 4).sum() - 1e-9
    # value heads that a group cannot split: the gather form only (8 value heads over 3 devices)
    assert cost.linear_forms(3) == ("lasp2",)
    assert CostModel.from_specs(small_cluster(), gdn_model(linear_sp="ring"), SMALL_COST).linear_forms(4) == ("ring",)
    forced = CostModel.from_specs(small_cluster(), gdn_model(linear_sp="heads"), SMALL_COST)
    assert forced.linear_forms(4) == ("heads",) and forced.sp_form(3, np.array([64])).linear == "lasp2"


def test_planner_gives_gated_delta_groups_the_form_it_prices():
    from pliant.planner import Planner, PlannerSpec, validate_plan

    planner = Planner.from_specs(small_cluster(memory_gib=4.0), gdn_model(), SMALL_COST, PlannerSpec(time_limit_s=0.3))
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(32, 256, 40), [6000, 9000]])
    plan = planner.plan(lengths)
    validate_plan(plan, planner.cost, planner.sizes)  # checks each group's form against sp_form(size, lengths)
    for mb in plan.micro_batches:
        for g in mb.groups:
            if g.seq_ids:
                assert g.form == planner.cost.sp_form(g.size, lengths[g.seq_ids])
    # groups of 4 (a fixed degree): a batch of short sequences runs the head all-to-all, one of
    # long ones the gather, each plan valid (its groups priced in the form they run)
    for batch, want in ((np.full(16, 64), "heads"), (np.full(4, 9000), "lasp2")):
        fixed = planner.plan_for(batch, 4)
        validate_plan(fixed, planner.cost)
        forms = {g.linear_sp for mb in fixed.micro_batches for g in mb.groups if g.seq_ids}
        assert forms == {want}, (batch[0], forms)


def test_linear_sp_heads_and_expert_parallel_bad_input():
    with pytest.raises(ValueError, match="linear_sp = heads: the head all-to-all form runs Gated DeltaNet layers only"):
        ModelSpec(**{**gdn_model().model_dump(), "linear_kind": "linear", "linear_sp": "heads"})
    with pytest.raises(ValueError, match="expert_parallel = 2: expert parallelism is not supported"):
        gdn_model(expert_parallel=2)
    with pytest.raises(ValueError, match="linear_heads = 6 is not a multiple of linear_key_heads = 4"):
        gdn_model(linear_heads=6)
