"""Ulysses sequence parallelism for softmax attention (DeepSpeed-Ulysses), packed varlen.

An all-to-all turns each rank's sequence chunks of all heads into whole sequences of H/s
heads; every rank then runs causal attention per sequence (document masking: no attention
across sequences of the pack); a second all-to-all turns the outputs back. Forward moves
q, k, v and o; backward the same four gradients. Needs H divisible by the group size:
otherwise use LASP-2H, which gathers K and V instead of sharding heads.
"""
from __future__ import annotations

import numpy as np
import torch

from .collectives import all_to_all, check_call
from .groups import SPGroup
from .pack import PackLayout
from .softmax_local import check_softmax_inputs, varlen_causal_attention


class AllToAll(torch.autograd.Function):
    """x [s, ...]: slice i to rank i. Its own adjoint: backward is the same exchange of gradients."""

    @staticmethod
    def forward(ctx, x, g: SPGroup, kind: str):
        ctx.g, ctx.kind = g, kind
        return all_to_all(x, g, kind)

    @staticmethod
    def backward(ctx, grad):
        return all_to_all(grad, ctx.g, ctx.kind + ".grad"), None, None


class HeadExchange:
    """Ulysses' exchange for a pack: this rank's chunks of every sequence over all heads
    [T, H, *d] <-> whole sequences over H / s heads [s * T, H / s, *d], in sequence order.
    The order (`sequence_order`) is built once per pack and serves every tensor exchanged."""

    def __init__(self, layout: PackLayout, group: SPGroup, device: torch.device):
        self.group, self.s, self.T = group, group.size, layout.local_tokens
        # rank-major received tokens are already in sequence order for a single sequence
        self.order = None if layout.n_seqs == 1 else sequence_order(layout).to(device)
        if self.order is not None:
            self.inverse = torch.empty_like(self.order)
            self.inverse[self.order] = torch.arange(len(self.order), device=device)

    def to_sequences(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        s, T, h, rest = self.s, self.T, x.shape[1] // self.s, tuple(x.shape[2:])
        x = x.reshape((T, s, h) + rest).transpose(0, 1)  # [s, T, h, *d]: head group i for rank i
        x = AllToAll.apply(x, self.group, kind)  # [s, T, h, *d]: rank r's tokens
        x = x.reshape((s * T, h) + rest)
        return x if self.order is None else x[self.order]  # whole sequences, in order

    def to_chunks(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        s, T, h, rest = self.s, self.T, x.shape[1], tuple(x.shape[2:])
        if self.order is not None:
            x = x[self.inverse]  # back to rank-major order: [s * T, h, *d]
        back = AllToAll.apply(x.reshape((s, T, h) + rest), self.group, kind)  # [s, T, h, *d]: head groups
        return back.transpose(0, 1).reshape((T, s * h) + rest)


def sequence_order(layout: PackLayout) -> torch.Tensor:
    """Index into the [s * local_tokens] received tokens (rank-major) that puts each
    sequence's chunks back in order: the packed full sequences, padded. Built on the host in
    one piece, so the torch ops do not grow with the number of sequences."""
    s, T = layout.group_size, layout.local_tokens
    chunks = np.asarray(layout.chunks, dtype=np.int64)
    starts = np.cumsum(chunks) - chunks  # each sequence's chunk offset on a rank
    seq = np.repeat(np.arange(len(chunks)), chunks * s)  # sequence of each output token
    pos = np.arange(int((chunks * s).sum())) - np.repeat(np.cumsum(chunks * s) - chunks * s, chunks * s)
    rank, within = pos // chunks[seq], pos % chunks[seq]
    return torch.from_numpy(rank * T + starts[seq] + within)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackLayout, group: SPGroup,
                      cu_seqlens: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Causal softmax attention of a packed set of sequences over an SP group (Ulysses).

    q [local_tokens, H, d], k, v [local_tokens, Hkv, d] (GQA), this rank's chunks in the
    pack layout. Returns [local_tokens, H, d].
    """
    s = group.size

    def local() -> None:
        check_softmax_inputs("ulysses_attention", q, k, v)
        H = q.shape[1]
        layout.check_local(q, "q", cu_seqlens)
        if layout.group_size != s:
            raise ValueError(f"ulysses_attention: the pack is laid out for {layout.group_size} ranks, the group has "
                             f"{s}")
        if H % s:
            raise ValueError(f"ulysses_attention: {H} heads do not divide over an SP group of {s} ranks; Ulysses "
                             f"shards heads, so use LASP-2H (lasp2h_attention) for this group size")

    check_call(group, "ulysses_attention", {"q": q, "k": k, "v": v}, layout.lengths, local)
    H = q.shape[1]
    if k.shape[1] % s:  # GQA with fewer kv heads than ranks: replicate kv heads (as DeepSpeed does)
        k = k.repeat_interleave(H // k.shape[1], dim=1)
        v = v.repeat_interleave(H // v.shape[1], dim=1)
    ex = HeadExchange(layout, group, q.device)
    qf, kf, vf = (ex.to_sequences(x, f"ulysses.{n}") for x, n in ((q, "q"), (k, "k"), (v, "v")))
    # every sequence at once: a few length buckets, one attention call each
    of = varlen_causal_attention(qf, kf, vf, [c * s for c in layout.chunks], None, scale)
    return ex.to_chunks(of, "ulysses.o")
