"""The torch.distributed calls the recorder wraps, by name, and the signature of a collective
that every member must agree on (no torch import: the master's rules use them too)."""
from __future__ import annotations

import zlib

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single",
               "all_to_all", "broadcast", "reduce", "barrier", "all_gather_object", "broadcast_object_list",
               "gather", "scatter", "reduce_scatter")
POINT_TO_POINT = ("send", "recv", "isend", "irecv")
SENDS = ("send", "isend")  # point-to-point sequence numbers count sends and receives of a pair apart
# collectives whose every member passes a tensor of the same shape (the desync check)
SAME_SHAPE = frozenset({"all_reduce", "reduce", "broadcast", "all_gather_into_tensor", "reduce_scatter_tensor",
                        "all_gather", "reduce_scatter", "barrier"})


def signature(op: str, dtype: str, shape: tuple[int, ...]) -> tuple:
    """What every member of a collective must agree on: op, dtype and, where members pass
    equal shapes, the shape."""
    return (op, dtype, tuple(shape) if op in SAME_SHAPE else None)


def signature_id(sig: tuple) -> int:
    """A signature as a number that is the same in every process (Python's hash of a string
    is salted per process): CRC-32 of its text."""
    return zlib.crc32(repr(sig).encode())
