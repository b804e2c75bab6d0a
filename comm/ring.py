"""LASP-1 ring baseline for linear attention: the memory state travels rank to rank.

Rank r waits for the state of chunks < r from rank r-1, adds its own chunk and passes it to
rank r+1: s-1 sequential hops forward, and the same backward for the state's gradient. It
is kept to compare LASP-2 against; the arithmetic is the same (see linear_local.py).
"""
from __future__ import annotations

import torch

from .collectives import recv, send
from .groups import SPGroup
from .linear_blocks import decay_powers
from .linear_fused import local_pack, one_rank
from .linear_local import acc_dtype, load_linear, prepare_linear, save_linear
from .pack import PackLayout


def _hop(rates, chunks, H, dtype, device) -> torch.Tensor:
    """lambda^C per sequence and head: [n, H, 1, 1]."""
    return decay_powers(rates, torch.tensor(chunks, device=device), H, dtype).view(len(chunks), H, 1, 1)


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rates, layout: PackLayout, g: SPGroup, block: int):
        dtype = acc_dtype(q.dtype)
        local = local_pack(q, k, v, rates, layout.chunks, block)
        states = local.states()
        local.intra()
        prefix = torch.zeros_like(states) if g.index == 0 else recv(states, g, g.index - 1, "ring.states")
        if g.index < g.size - 1:
            send(_hop(rates, layout.chunks, q.shape[1], dtype, q.device) * prefix + states, g, g.index + 1, "ring.states")
        save_linear(ctx, q, k, v, prefix, rates, layout, g, block)
        return local.output(prefix).to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, prefix, rates, layout, g, dtype = load_linear(ctx)
        do = dout.to(dtype)
        pd = prefix.detach().requires_grad_(True)
        leaves = tuple(t.detach().requires_grad_(True) for t in (q, k, v))
        with torch.enable_grad():
            local = local_pack(*leaves, rates, layout.chunks, ctx.block)
            out, states = local.output(pd), local.states()
            passed = _hop(rates, layout.chunks, q.shape[1], dtype, q.device) * pd + states  # what went to rank r+1
        # the gradient of the state sent forward comes back from rank r+1
        d_passed = torch.zeros_like(prefix) if g.index == g.size - 1 else recv(prefix, g, g.index + 1, "ring.grad")
        wrt = (*leaves, pd)
        grads = torch.autograd.grad([out, passed], wrt, [do, d_passed], allow_unused=True)
        dq, dk, dv, dprefix = (torch.zeros_like(t) if gr is None else gr for gr, t in zip(grads, wrt))
        if g.index > 0:
            send(dprefix, g, g.index - 1, "ring.grad")
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackLayout, group: SPGroup,
                   decay_rates: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                   block: int = 256) -> torch.Tensor:
    """Causal linear attention over an SP group with the LASP-1 ring; same contract as lasp2_attention."""
    rates = prepare_linear("ring_attention", q, k, v, layout, group, decay_rates, cu_seqlens)
    out = one_rank(q, k, v, layout.lengths, group, rates)
    if out is not None:
        return out
    return _Ring.apply(q, k, v, rates, layout, group, block)
