"""Sequence blaster: split a global batch into micro-batches when it does not fit the
cluster's memory at once (FlexSP), and choose how many.

More micro-batches need less memory each but pay the per-group overhead once more and give
the solver fewer sequences to balance, so the count is chosen by predicted total time.
Two splits are tried for each count: contiguous ranges of the length-sorted batch with
the largest part as small as possible (min-max partition; long sequences travel together,
so the micro-batches holding only short ones can use small groups), and a snake deal that
gives each micro-batch a similar mix.
"""
from __future__ import annotations

import math

import numpy as np

from .cost import CostModel


def min_micro_batches(lengths: np.ndarray, cost: CostModel) -> int:
    """Micro-batches the activation memory alone requires (ignoring padding and layout)."""
    per_device = cost.device_memory_bytes - cost.model_state_bytes
    if per_device <= 0:
        return 1
    need = float(np.sum(lengths)) * cost.act_bytes_per_token / (cost.world_size * per_device)
    return max(1, math.ceil(need - 1e-12))


def _weights(lengths: np.ndarray, cost: CostModel) -> np.ndarray:
    single = cost.single_device_ms(lengths)
    L = np.asarray(lengths, dtype=np.float64)
    return single / single.sum() + L / L.sum()


def split_min_max(lengths: np.ndarray, k: int, cost: CostModel) -> list[np.ndarray]:
    """Contiguous ranges of the length-sorted batch, minimising the heaviest range (at most k)."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    if k <= 1:
        return [order]
    w = _weights(lengths, cost)[order]
    lo, hi = float(w.max()), float(w.sum())
    for _ in range(50):
        mid = (lo + hi) / 2
        if _count_parts(w, mid) <= k:
            hi = mid
        else:
            lo = mid
    parts, start, acc = [], 0, 0.0
    for i, wi in enumerate(w):
        if acc + wi > hi and i > start:
            parts.append(order[start:i])
            start, acc = i, 0.0
        acc += wi
    parts.append(order[start:])
    return parts


def _count_parts(w: np.ndarray, limit: float) -> int:
    """Parts of the greedy left-to-right cut with at most `limit` weight each (a part holds at
    least one item): one binary search per part on the prefix sums."""
    cum = np.concatenate([[0.0], np.cumsum(w)])
    count, start, n = 0, 0, len(w)
    while start < n:
        end = int(np.searchsorted(cum, cum[start] + limit, side="right")) - 1
        start = max(end, start + 1)
        count += 1
    return count


def split_snake(lengths: np.ndarray, k: int) -> list[np.ndarray]:
    order = np.argsort(-np.asarray(lengths), kind="stable")
    if k <= 1:
        return [order]
    lanes = np.concatenate([np.arange(k), np.arange(k)[::-1]])
    which = lanes[np.arange(len(order)) % (2 * k)]
    return [order[which == i] for i in range(k) if np.any(which == i)]


CUT_FRACTIONS = (0.15, 0.25, 0.35, 0.45, 0.55, 0.65)  # where the first cut of split_cut may fall


def split_cut(lengths: np.ndarray, k: int, cost: CostModel, first: float) -> list[np.ndarray]:
    """FlexSP's split: the length-sorted batch cut contiguously, the longest sequences
    together in the first micro-batch, which ends where `first` of the batch's weight
    (_weights) has been taken; the rest cut min-max into k - 1."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    if k <= 1:
        return [order]
    w = _weights(lengths, cost)[order]
    cut = int(np.searchsorted(np.cumsum(w), first * w.sum(), side="left")) + 1
    cut = min(max(cut, 1), len(order) - (k - 1))
    rest = order[cut:]
    tail = split_min_max(np.asarray(lengths)[rest], k - 1, cost)
    return [order[:cut], *(rest[part] for part in tail)]


def candidate_splits(lengths: np.ndarray, k: int, cost: CostModel) -> list[tuple[str, list[np.ndarray]]]:
    """The splits tried for k micro-batches, in order: min-max and snake first, then FlexSP's
    sorted cut at several first-cut points (duplicates of an earlier split left out). A
    later family only adds candidates: the best over them is never worse than over fewer."""
    if k == 1:
        return [("single", split_min_max(lengths, 1, cost))]
    out = [("min-max", split_min_max(lengths, k, cost)), ("snake", split_snake(lengths, k))]
    if len(lengths) > k:
        seen = {tuple(map(tuple, (np.sort(p) for p in parts))) for _, parts in out}
        for f in CUT_FRACTIONS:
            parts = split_cut(lengths, k, cost, f)
            key = tuple(map(tuple, (np.sort(p) for p in parts)))
            if key not in seen and all(len(p) for p in parts):
                seen.add(key)
                out.append((f"cut-{f:g}", parts))
    return out
