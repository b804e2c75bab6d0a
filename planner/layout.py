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
    remaining nodes (first-fit decreasing, then an exact search if that fails: this is bin
    packing, and FFD alone misses packings such as 4+2+2 | 3+3+2). Ranks left free are not
    assigned here: the caller covers them with groups of one.
    """
    n_nodes = world // per_node
    starts: list[int] = [-1] * len(sizes)
    next_node = 0
    small: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        s = sizes[i]
        if s <= per_node:
            small.append(i)
            continue
        if s % per_node or next_node + s // per_node > n_nodes:
            return None
        starts[i] = next_node * per_node
        next_node += s // per_node
    nodes = list(range(next_node, n_nodes))
    if sum(sizes[i] for i in small) > len(nodes) * per_node:
        return None
    node_of = _pack(small, sizes, nodes, per_node)
    if node_of is None:
        return None
    fill = {n: 0 for n in nodes}
    for i in small:
        n = node_of[i]
        starts[i] = n * per_node + fill[n]
        fill[n] += sizes[i]
    return starts


def _pack(items: list[int], sizes: list[int], nodes: list[int], per_node: int) -> dict[int, int] | None:
    """Assign items (indices into sizes, largest first) to nodes of capacity per_node."""
    free = {n: per_node for n in nodes}
    node_of: dict[int, int] = {}
    for i in items:  # first-fit decreasing
        n = next((n for n in nodes if free[n] >= sizes[i]), None)
        if n is None:
            break
        node_of[i] = n
        free[n] -= sizes[i]
    else:
        return node_of
    free_list = [per_node] * len(nodes)
    assign: list[int] = [0] * len(items)
    dead: set[tuple] = set()

    def rec(k: int) -> bool:
        if k == len(items):
            return True
        key = (k, tuple(sorted(free_list)))
        if key in dead:
            return False
        s = sizes[items[k]]
        tried: set[int] = set()
        for n in range(len(nodes)):
            f = free_list[n]
            if f >= s and f not in tried:
                tried.add(f)
                free_list[n] -= s
                assign[k] = n
                if rec(k + 1):
                    return True
                free_list[n] += s
        dead.add(key)
        return False

    if not rec(0):
        return None
    return {i: nodes[assign[k]] for k, i in enumerate(items)}


def free_ranks(starts: list[int], sizes: list[int], world: int) -> list[int]:
    used = [False] * world
    for st, s in zip(starts, sizes):
        for r in range(st, st + s):
            used[r] = True
    return [r for r in range(world) if not used[r]]
