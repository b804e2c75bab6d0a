"""Bad input to the comm layer: clear errors on every rank, never a hang."""
from __future__ import annotations

import time

import pytest
import torch

from pliant.comm import PackLayout, PackLayoutError, contiguous_layouts

from dist_pool import DistPool


@pytest.fixture(scope="module")
def pool():
    p = DistPool(4, timeout_s=60, pg_timeout_s=30)
    yield p
    p.close()


def test_group_the_caller_is_not_in(pool):
    out = pool.run("dist_jobs:call", 0, 2, "not_in_group")
    assert out[:2] == ["ok", "ok"]
    for rank in (2, 3):
        assert out[rank].startswith("NotInGroupError") and f"rank {rank} is not in SP group 0..1" in out[rank]


def test_unknown_layout_is_an_error_not_a_hang(pool):
    t0 = time.time()
    out = pool.run("dist_jobs:call", 1, 5, "unknown_layout")
    assert all(o.startswith("UnknownGroupError") and "ranks 1..5" in o and "not registered" in o for o in out)
    assert time.time() - t0 < 10


def test_shapes_that_disagree_raise_on_every_rank(pool):
    t0 = time.time()
    out = pool.run("dist_jobs:call", 0, 4, "shape_mismatch")
    for o in out:
        assert o.startswith("CollectiveMismatchError"), o
        assert "rank 1 disagrees with rank 0" in o and "q.shape[1]" in o
    assert time.time() - t0 < 10  # found by the metadata check, not by a timeout


@pytest.mark.parametrize("op", ["ulysses", "lasp2h", "lasp2", "ring", "gdn"])
@pytest.mark.parametrize("size", [2, 4])
def test_one_rank_off_the_layout_raises_on_every_rank(pool, size, op):
    """The group's last rank passes one token fewer than the pack's layout gives: every rank of
    the group raises the same error quoting it, rather than the peers waiting in the operator's
    first collective for the process group's timeout."""
    t0 = time.time()
    out = pool.run("dist_jobs:call", 0, size, f"one_rank_wrong_tokens:{op}")
    assert time.time() - t0 < 10
    bad = size - 1
    # the same text on every rank of the group (the failing rank's PackLayoutError chained on it)
    assert len(set(out[:size])) == 1, out
    assert out[0].startswith("CollectiveMismatchError") and f"rank {bad}'s inputs failed its checks: " \
        "PackLayoutError" in out[0] and "local tokens" in out[0], out


def test_one_rank_without_a_tensor_raises_on_every_rank(pool):
    """A rank whose call cannot even be described (None for a tensor) still takes part in the
    shared check: its peers raise with it instead of waiting in the metadata exchange."""
    t0 = time.time()
    out = pool.run("dist_jobs:call", 0, 2, "one_rank_none")
    assert time.time() - t0 < 10
    assert len(set(out[:2])) == 1 and out[0].startswith("CollectiveMismatchError") and \
        "rank 1's inputs failed its checks" in out[0], out


def test_metadata_check_can_be_switched_off(pool):
    assert pool.run("dist_jobs:call", 0, 2, "shape_mismatch_unchecked")[:2] == ["ok", "ok"]


@pytest.mark.parametrize("what, expect", [
    ("int_dtype", ["TypeError", "torch.int64", "supported: float64"]),
    ("wrong_tokens", ["PackLayoutError", "local tokens", "chunk layout"]),
    ("wrong_cu_seqlens", ["PackLayoutError", "cu_seqlens", "do not match"]),
    ("ulysses_heads", ["3 heads do not divide over an SP group of 2", "LASP-2H"]),
])
def test_bad_inputs(pool, what, expect):
    out = pool.run("dist_jobs:call", 2, 2, what)
    assert out[:2] == [None, None]
    for o in out[2:]:
        for part in expect:
            assert part in o, (part, o)


def test_pack_layout():
    layout = PackLayout.from_lengths([10, 1, 7], 4)
    assert layout.chunks == (3, 1, 2) and layout.padded == (12, 4, 8) and layout.local_tokens == 6
    assert layout.cu_seqlens().tolist() == [0, 3, 4, 6]
    assert layout.real_in_chunk(3) == (1, 0, 1)
    assert layout.real_mask(3).tolist() == [True, False, False, False, True, False]
    seqs = [torch.arange(L, dtype=torch.float64) for L in (10, 1, 7)]
    shards = [layout.shard(seqs, r) for r in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(layout.unshard(shards), seqs))
    with pytest.raises(PackLayoutError, match="positive"):
        PackLayout.from_lengths([3, 0], 2)
    with pytest.raises(PackLayoutError, match="at least one"):
        PackLayout.from_lengths([], 2)


def test_contiguous_layouts_follow_the_planner_rule():
    assert len(contiguous_layouts(4)) == 10
    lay = contiguous_layouts(16, per_node=8, sizes=[1, 3, 8, 16])
    assert (5, 3) in lay and (6, 3) not in lay  # 6..8 would span two nodes
    assert (0, 16) in lay and (8, 8) in lay and (4, 8) not in lay
