"""Allowed group sizes, node patterns and rank placement."""
from __future__ import annotations

from pliant.planner.layout import allowed_sizes, free_ranks, node_patterns, place_groups


def test_allowed_sizes():
    assert allowed_sizes(64, 8) == [1, 2, 3, 4, 5, 6, 7, 8, 16, 24, 32, 40, 48, 56, 64]
    assert allowed_sizes(64, 8, power_of_two=True) == [1, 2, 4, 8, 16, 32, 64]
    assert allowed_sizes(64, 8, max_size=16) == [1, 2, 3, 4, 5, 6, 7, 8, 16]
    assert allowed_sizes(4, 4) == [1, 2, 3, 4]
    assert allowed_sizes(6, 2) == [1, 2, 4, 6]


def test_node_patterns_are_the_partitions():
    assert len(node_patterns(8, tuple(range(1, 9)))) == 22  # p(8)
    assert set(node_patterns(4, (1, 2, 4))) == {(4,), (2, 2), (2, 1, 1), (1, 1, 1, 1)}


def test_place_groups_respects_nodes():
    sizes = [3, 16, 5, 2, 2, 4]
    starts = place_groups(sizes, 32, 8)
    assert starts is not None
    for st, s in zip(starts, sizes):
        if s <= 8:
            assert st // 8 == (st + s - 1) // 8
        else:
            assert st % 8 == 0
    spans = sorted((st, st + s) for st, s in zip(starts, sizes))
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert free_ranks(starts, sizes, 32) == [r for r in range(32) if not any(a <= r < b for a, b in spans)]


def test_place_groups_rejects_impossible_layouts():
    assert place_groups([5, 5, 5], 16, 8) is None  # three groups of 5 need three nodes
    assert place_groups([12], 16, 8) is None  # larger than a node but not whole nodes
    assert place_groups([16, 8], 16, 8) is None
    assert place_groups([8, 8], 16, 8) == [0, 8]
    assert place_groups([3, 16, 5, 8, 2, 2], 32, 8) is None  # 36 devices


def test_place_groups_finds_packings_first_fit_misses():
    # first-fit decreasing puts 4+3 together and strands a 2; 4+2+2 | 3+3+2 fits
    starts = place_groups([4, 3, 3, 2, 2, 2], 16, 8)
    assert starts is not None
    for st, s in zip(starts, [4, 3, 3, 2, 2, 2]):
        assert st // 8 == (st + s - 1) // 8
