"""LASP-2 and the LASP-1 ring against a single-process reference, float64, over real gloo ranks."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pliant.comm.linear_local import default_decay_rates

from comm_check import check
from dist_jobs import make_inputs
from oracle import linear_attention_quadratic, linear_attention_recurrent

WORLDS = (1, 2, 4)



def test_reference_forms_agree():
    for decay in (False, True):
        rates = default_decay_rates(3) if decay else None
        q, k, v, _ = make_inputs([23], 3, 3, 4, 5, seed=1)[0]
        a = linear_attention_quadratic(q, k, v, rates)
        b = linear_attention_recurrent(q, k, v, rates)
        assert (a - b).abs().max().item() < 1e-12


@pytest.mark.parametrize("method", ["lasp2", "ring"])
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("decay", [False, True])
def test_exact_on_a_pack(pools, method, world, decay):
    # lengths not multiples of the group size; one sequence shorter than the group
    check(pools[world], method, [13, 1, 30, 7], 0, world, decay=decay)


@pytest.mark.parametrize("method", ["lasp2", "ring"])
def test_subgroups_of_a_larger_world(pools, method):
    """Mixed plans run groups on rank ranges: ranks 2-3 of 4, and rank 1 alone."""
    check(pools[4], method, [9, 22, 5], 2, 2)
    check(pools[4], method, [9, 22, 5], 1, 1)


def test_blocks_smaller_than_chunks(pools):
    check(pools[2], "lasp2", [70, 33], 0, 2, options={"block": 8})


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=5), world=st.sampled_from(WORLDS),
       decay=st.booleans(), heads=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_random_packs(pools, lengths, world, decay, heads, seed):
    check(pools[world], "lasp2", lengths, 0, world, heads=heads, seed=seed, decay=decay)


def test_state_volume_is_independent_of_length(pools):
    short = check(pools[4], "lasp2", [16], 0, 4, decay=True)
    long = check(pools[4], "lasp2", [400], 0, 4, decay=True)
    for a, b in zip(short, long):
        assert a[5] == b[5]  # identical counters: one AllGather of heads x dk x dv states, fwd and bwd
    state = 2 * 3 * 4 * 8  # heads x dk x dv float64
    fwd = short[0][5]["lasp2.states@0-3"]
    assert fwd == {"calls": 1, "bytes_sent": 3 * state, "bytes_recv": 3 * state}
