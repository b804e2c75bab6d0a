"""Counted collectives over an SP group, plus the cheap metadata check that turns a shape
disagreement between ranks into an error on every rank instead of a hang or garbage.

All functions are no-ops for a group of one. They work for gloo and nccl alike.
"""
from __future__ import annotations

import os
import zlib
from collections.abc import Callable

import torch
import torch.distributed as dist

from .counters import COUNTERS
from .groups import SPGroup


def _all_gather_into(*args, **kwargs):
    # looked up at call time, so that a collective recorder installed later sees these calls
    return (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(*args, **kwargs)


def _reduce_scatter_into(*args, **kwargs):
    return (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(*args, **kwargs)


_CHECK = os.environ.get("PLIANT_COMM_CHECK", "1") != "0"


class CollectiveMismatchError(RuntimeError):
    """Ranks of a group called the same collective with different metadata."""


def set_metadata_check(enabled: bool) -> None:
    """Turn the per-operator metadata check on or off (on by default; env PLIANT_COMM_CHECK=0)."""
    global _CHECK
    _CHECK = bool(enabled)


def metadata_check_enabled() -> bool:
    return _CHECK


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


def all_gather(x: torch.Tensor, g: SPGroup, kind: str, async_op: bool = False):
    """Stack every rank's `x` along a new leading dim of size g.size; returns (out, work)."""
    x = x.contiguous()
    flat = torch.empty(g.size * x.numel(), dtype=x.dtype, device=x.device)
    out = flat.view((g.size,) + tuple(x.shape))
    if g.size == 1:
        out[0] = x
        return out, None
    work = _all_gather_into(flat, x.reshape(-1), group=g.pg, async_op=async_op)
    n = _nbytes(x)
    COUNTERS.record(kind, g.name, n * (g.size - 1), n * (g.size - 1))
    return out, work


def reduce_scatter(x: torch.Tensor, g: SPGroup, kind: str) -> torch.Tensor:
    """x: [g.size, ...] on every rank; returns this rank's slice summed over ranks."""
    if g.size == 1:
        return x[0].clone()
    x = x.contiguous()
    out = torch.empty(tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter_into(out.view(-1), x.view(-1), group=g.pg)
    n = _nbytes(x) * (g.size - 1) // g.size
    COUNTERS.record(kind, g.name, n, n)
    return out


def all_to_all(x: torch.Tensor, g: SPGroup, kind: str) -> torch.Tensor:
    """x: [g.size, ...]: slice i goes to rank i of the group; returns [g.size, ...] of slices received."""
    if g.size == 1:
        return x.clone()
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out.view(-1), x.view(-1), group=g.pg)
    n = _nbytes(x) * (g.size - 1) // g.size
    COUNTERS.record(kind, g.name, n, n)
    return out


def send(x: torch.Tensor, g: SPGroup, to_index: int, kind: str) -> None:
    dist.send(x.contiguous(), dst=g.global_rank(to_index), group=g.pg)
    COUNTERS.record(kind, g.name, _nbytes(x), 0)


def recv(like: torch.Tensor, g: SPGroup, from_index: int, kind: str) -> torch.Tensor:
    out = torch.empty_like(like)
    dist.recv(out, src=g.global_rank(from_index), group=g.pg)
    COUNTERS.record(kind, g.name, 0, _nbytes(out))
    return out


_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def check_call(g: SPGroup, op: str, tensors: dict[str, torch.Tensor], lengths: tuple[int, ...],
               local: Callable[[], None]) -> None:
    """An operator's checks, raised on every rank of its group: `local` (this rank's inputs
    against the pack's layout; it raises), then the shared metadata check, which carries whether
    `local` failed. A bad input on one rank thus raises there and, at once, on its peers, instead
    of leaving them in the operator's first collective until the process group's timeout."""
    if g.size == 1 or not _CHECK:
        local()
        return
    try:
        local()
        error = None
    except Exception as e:  # noqa: BLE001 (any local check's error: shared, then raised as it is)
        error = e
    check_metadata(g, op, tensors, lengths, error)


def _describe(tensors: dict[str, torch.Tensor], lengths: tuple[int, ...]) -> list[tuple[str, int]]:
    fields = []
    for name, t in tensors.items():
        fields.append((f"{name}.dtype", _DTYPES.index(t.dtype) if t.dtype in _DTYPES else 99))
        fields.append((f"{name}.ndim", t.dim()))
        for d, size in enumerate(t.shape[1:], 1):
            fields.append((f"{name}.shape[{d}]", int(size)))
    fields.append(("pack sequences", len(lengths)))
    fields.append(("pack lengths", zlib.crc32(repr(tuple(lengths)).encode())))
    return fields


def _device(g: SPGroup, tensors: dict) -> torch.device:
    """Where the check's integers go: the inputs' device (nccl needs device tensors), else the
    group's backend's."""
    for t in tensors.values():
        if isinstance(t, torch.Tensor):
            return t.device
    if dist.get_backend(g.pg) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_metadata(g: SPGroup, op: str, tensors: dict[str, torch.Tensor], lengths: tuple[int, ...],
                   local_error: Exception | None) -> None:
    """All-gather a few integers describing the call (operator, whether this rank's local checks
    failed, dtypes, shapes beyond the token dim, the pack's lengths) and raise on every rank of
    a group of 2 or more (check_call's) if any rank differs: a CollectiveMismatchError with the
    same text everywhere, quoting the failing rank's `local_error` when there is one."""
    try:
        described = _describe(tensors, lengths)
    except Exception as e:  # noqa: BLE001 (not tensors, say: this rank's call is wrong; its peers must hear it)
        described, local_error = [], local_error or TypeError(f"{op}'s inputs cannot be described: {e}")
    fields: list[tuple[str, int]] = [("operator", zlib.crc32(op.encode())), ("local checks", int(local_error is not None))]
    fields += described
    device = _device(g, tensors)
    mine = torch.tensor([v for _, v in fields] + [len(fields)], dtype=torch.int64, device=device)
    # ranks may disagree on the number of fields: gather the count first, then pad to the maximum
    counts, _ = all_gather(torch.tensor([len(fields)], dtype=torch.int64, device=device), g, "meta")
    width = int(counts.max()) + 1
    padded = torch.full((width,), -1, dtype=torch.int64, device=device)
    padded[: len(mine)] = mine
    everyone, _ = all_gather(padded, g, "meta")
    if bool((everyone[:, 1] != 0).any()):  # some rank's inputs failed its local checks: share why
        texts: list[str | None] = [None] * g.size
        dist.all_gather_object(texts, None if local_error is None else f"{type(local_error).__name__}: {local_error}",
                               group=g.pg)
        bad = next(i for i, t in enumerate(texts) if t)
        # the same text on every rank of the group (the fault monitor's "same exception on every
        # rank" rule: a program's error, not a fault), the failing rank's own error chained
        raise CollectiveMismatchError(f"{op} in SP group {g.name}: rank {g.global_rank(bad)}'s inputs failed its "
                                      f"checks: {texts[bad]}") from local_error
    if bool((everyone == everyone[0]).all()):
        return
    for i in range(g.size):
        if not torch.equal(everyone[i], everyone[0]):
            diff = [name for k, (name, _) in enumerate(fields) if k >= everyone.shape[1] or everyone[i, k] != everyone[0, k]]
            raise CollectiveMismatchError(
                f"{op} in SP group {g.name}: rank {g.global_rank(i)} disagrees with rank {g.start} on "
                f"{', '.join(diff[:4]) or 'the number of tensors'}; every rank of a group "
                f"must call it with the same pack and shapes"
            )
