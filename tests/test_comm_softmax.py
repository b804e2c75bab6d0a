"""Ulysses and LASP-2H against single-process causal softmax attention, float64, over gloo."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comm_check import check

WORLDS = (1, 2, 4)



@pytest.mark.parametrize("method", ["ulysses", "lasp2h"])
@pytest.mark.parametrize("world", WORLDS)
def test_exact_on_a_pack(pools, method, world):
    check(pools[world], method, [13, 1, 30, 7], 0, world, heads=4, kv_heads=4)


@pytest.mark.parametrize("method", ["ulysses", "lasp2h"])
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_gqa(pools, method, kv_heads):
    # kv_heads=1 < group size: Ulysses replicates kv heads
    check(pools[4], method, [11, 26], 0, 4, heads=4, kv_heads=kv_heads)


def test_lasp2h_any_head_count(pools):
    check(pools[4], "lasp2h", [17, 9], 0, 4, heads=3, kv_heads=1)


@pytest.mark.parametrize("method", ["ulysses", "lasp2h"])
def test_subgroups_of_a_larger_world(pools, method):
    check(pools[4], method, [9, 22, 5], 1, 2, heads=2, kv_heads=2)
    check(pools[4], method, [9, 22, 5], 3, 1, heads=2, kv_heads=2)


def test_blocked_queries(pools):
    check(pools[2], "lasp2h", [70], 0, 2, heads=2, options={})  # one block
    from pliant.comm import softmax_local

    old = softmax_local.MAX_SCORES
    try:  # blocking happens in the worker processes, so test the local function here
        softmax_local.MAX_SCORES = 16
        import torch

        from oracle import softmax_attention

        q, k, v = (torch.randn(37, 2, 4, dtype=torch.float64) for _ in range(3))
        full = softmax_attention(q, k, v)
        out = softmax_local.causal_attention(q[20:], k, v, 20, block=5)
        assert (out - full[20:]).abs().max().item() < 1e-12
    finally:
        softmax_local.MAX_SCORES = old


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=5), world=st.sampled_from(WORLDS),
       method=st.sampled_from(["ulysses", "lasp2h"]), seed=st.integers(0, 2**16))
def test_random_packs(pools, lengths, world, method, seed):
    check(pools[world], method, lengths, 0, world, heads=4, kv_heads=2, seed=seed)
