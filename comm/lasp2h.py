"""LASP-2H: sequence parallelism for the softmax layers of hybrid models.

Each rank keeps its chunk of queries and all heads; one AllGather of K and V gives every
rank the keys and values of the whole pack; each rank runs causal attention of its chunk
against the chunks up to its own (document masking per sequence). Backward reduce-scatters
dK and dV back to the ranks that own them. Works for any head count, unlike Ulysses.
"""
from __future__ import annotations

import numpy as np
import torch

from .collectives import all_gather, check_call, reduce_scatter
from .groups import SPGroup
from .pack import PackLayout
from .softmax_local import check_softmax_inputs, varlen_causal_attention
from .ulysses import sequence_order


class _GatherKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g: SPGroup):
        ctx.g = g
        out, _ = all_gather(x, g, "lasp2h.kv")
        return out  # [s, T, Hkv, d]

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter(grad, ctx.g, "lasp2h.grad_kv"), None


def lasp2h_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackLayout, group: SPGroup,
                     cu_seqlens: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Causal softmax attention over an SP group by gathering K and V (LASP-2H); same
    contract as ulysses_attention, any head count."""
    s = group.size

    def local() -> None:
        check_softmax_inputs("lasp2h_attention", q, k, v)
        layout.check_local(q, "q", cu_seqlens)
        if layout.group_size != s:
            raise ValueError(f"lasp2h_attention: the pack is laid out for {layout.group_size} ranks, the group has {s}")

    check_call(group, "lasp2h_attention", {"q": q, "k": k, "v": v}, layout.lengths, local)
    T = layout.local_tokens
    order = sequence_order(layout).to(q.device)
    kf = _GatherKV.apply(k, group).reshape(s * T, *k.shape[1:])[order]
    vf = _GatherKV.apply(v, group).reshape(s * T, *v.shape[1:])[order]
    # every sequence at once: its keys of chunks 0..index, its queries after the chunks before
    chunks = np.asarray(layout.chunks, dtype=np.int64)
    seen = (group.index + 1) * chunks
    starts = np.cumsum(chunks * s) - chunks * s
    rows = torch.from_numpy(np.concatenate([np.arange(a, a + n) for a, n in zip(starts, seen)])).to(q.device)
    return varlen_causal_attention(q, kf.index_select(0, rows), vf.index_select(0, rows), seen.tolist(),
                                   (group.index * chunks).tolist(), scale)
