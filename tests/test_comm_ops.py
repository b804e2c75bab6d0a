"""The SP operators' local compute works on a whole pack at once: the torch ops of one forward
+ backward grow neither with the number of sequences nor with their length (counted with
torch.profiler on one rank; every op is at least one kernel launch on a GPU)."""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from pliant.comm import PackLayout, SPGroup, lasp2_attention, lasp2h_attention, ring_attention, ulysses_attention
from pliant.comm.linear_local import default_decay_rates

SOLO = SPGroup(0, 1, 0, None)
OPS = {"lasp2": lambda q, k, v, lay: lasp2_attention(q, k, v, lay, SOLO, default_decay_rates(q.shape[1])),
       "ring": lambda q, k, v, lay: ring_attention(q, k, v, lay, SOLO, default_decay_rates(q.shape[1])),
       "ulysses": lambda q, k, v, lay: ulysses_attention(q, k, v, lay, SOLO),
       "lasp2h": lambda q, k, v, lay: lasp2h_attention(q, k, v, lay, SOLO)}


def aten_ops(op: str, lengths: list[int], heads: int = 4, head_dim: int = 32) -> int:
    T = sum(lengths)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(T, heads, head_dim, generator=g).requires_grad_(True) for _ in range(3))
    lay = PackLayout.from_lengths(lengths, 1)

    def step():
        OPS[op](q, k, v, lay).sum().backward()

    step()  # first-call work (caches, lazy inits) is not the steady state
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


@pytest.mark.parametrize("op", list(OPS))
def test_ops_per_pass_do_not_grow_with_sequences_or_length(op):
    one, many = aten_ops(op, [4096]), aten_ops(op, [64] * 64)
    longer = aten_ops(op, [8192])
    assert max(one, many, longer) <= 2000, (one, many, longer)
    assert many <= 1.5 * one, f"{op}: {many} ops for 64 sequences against {one} for one of the same tokens"
    assert longer <= 1.2 * one, f"{op}: {longer} ops for 8192 tokens against {one} for 4096"


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("world", [2, 4])
def test_ops_per_pass_do_not_grow_with_sequences_over_ranks(pools, op, world):
    """The same on every rank of a group: the global part (states gathered and summed per
    sequence, K and V gathered, tokens exchanged) is batched over the sequences too."""
    one = pools[world].run("dist_jobs:count_ops", op, [4096])
    many = pools[world].run("dist_jobs:count_ops", op, [64] * 64)
    for rank, (a, b) in enumerate(zip(one, many)):
        assert max(a, b) <= 2000 and b <= 1.5 * a, f"{op}, rank {rank} of {world}: {b} ops for 64 sequences, {a} for one"
