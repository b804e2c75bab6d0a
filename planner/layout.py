"""Which SP group sizes a cluster allows, and where groups sit on the ranks.

A group is a contiguous rank range. A group no larger than a node stays inside one node
(its all-to-all runs over the intra-node fabric); a larger group is made of whole nodes,
node-aligned, because a group that took part of a node would push that node's other
groups' traffic through the same NICs and the measured bandwidth table would no longer
describe it.
"""
from __future__ import annotations

from functools import lru_cache


def allowed_sizes(world: int, per_node: int, power_of_two: bool = False, max_size: int | None = None) -> list[int]:
    """Group sizes a plan may use, ascending: 1..per_node, then whole multiples of a node."""
    def ok(s: int) -> bool:
        return (not power_of_two or s & (s - 1) == 0) and (max_size is None or s <= max_size)

    small = [s for s in range(1, min(per_node, world) + 1) if ok(s)]
    large = [k * per_node for k in range(2, world // per_node + 1) if ok(k * per_node)]
    return small + large


@lru_cache(maxsize=64)
def node_patterns(per_node: int, sizes: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """All ways to fill one node with groups of the given small sizes (multisets, descending)."""
    small = sorted((s for s in sizes if s <= per_node), reverse=True)
    out: list[tuple[int, ...]] = []

    def rec(left: int, start: int, acc: list[int]) -> None:
        if left == 0:
            out.append(tuple(acc))
            return
        for i in range(start, len(small)):
            if small[i] <= left:
                acc.append(small[i])
                rec(left - small[i], i, acc)
                acc.pop()

    rec(per_node, 0, [])
    return tuple(out)


def place_groups(sizes: list[int], world: int, per_node: int) -> list[int] | None:
    """Start rank for each group size (same order as `sizes`), or None if they do not fit.

    Large groups take whole nodes from rank 0 up; small groups are packed into the
    remaining nodes first-fit decreasing. Ranks left free are not assigned here: the
    caller covers them with groups of one.
    """
    starts: list[int | None] = [None] * len(sizes)
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    n_nodes = world // per_node if world >= per_node else 1
    node_cap = min(per_node, world)
    next_node = 0
    free = [node_cap] * n_nodes  # free devices at the end of each node
    for i in order:
        s = sizes[i]
        if s > node_cap:
            if s % per_node:
                return None
            k = s // per_node
            if next_node + k > n_nodes:
                return None
            starts[i] = next_node * per_node
            for n in range(next_node, next_node + k):
                free[n] = 0
            next_node += k
            continue
        for n in range(next_node, n_nodes):
            if free[n] >= s:
                starts[i] = n * per_node + (node_cap - free[n])
                free[n] -= s
                break
        else:
            return None
    return [int(x) for x in starts]  # type: ignore[arg-type]


def free_ranks(starts: list[int], sizes: list[int], world: int) -> list[int]:
    used = [False] * world
    for st, s in zip(starts, sizes):
        for r in range(st, st + s):
            used[r] = True
    return [r for r in range(world) if not used[r]]
