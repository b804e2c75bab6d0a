"""LASP-1 ring baseline for linear attention: the memory state travels rank to rank.

Rank r waits for the state of chunks < r from rank r-1, adds its own chunk and passes it to
rank r+1: s-1 sequential hops forward, and the same backward for the state's gradient. It
is kept to compare LASP-2 against; the arithmetic is the same (see linear_local.py).
"""
from __future__ import annotations

import torch

from .collectives import check_metadata, recv, send
from .groups import SPGroup
from .lasp2 import _split
from .linear_local import acc_dtype, check_inputs, chunk_decay, chunk_forward, chunk_state, inter_output
from .pack import PackLayout


def _hop(rates, chunks, n, H, dtype) -> torch.Tensor:
    """lambda^C per sequence and head: [n, H, 1, 1]."""
    one = torch.ones(1, dtype=torch.int64)
    return torch.stack([chunk_decay(rates, chunks[j], one, dtype)[0].expand(H) for j in range(n)]).view(n, H, 1, 1)


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rates, layout: PackLayout, g: SPGroup, block: int):
        dtype = acc_dtype(q.dtype)
        cu = layout.cu_seqlens().tolist()
        qs, ks, vs = (_split(t.to(dtype), cu) for t in (q, k, v))
        n, H = layout.n_seqs, q.shape[1]
        states = torch.stack([chunk_state(ks[j], vs[j], rates) for j in range(n)])
        intra = [chunk_forward(qs[j], ks[j], vs[j], rates, block) for j in range(n)]
        prefix = torch.zeros_like(states) if g.index == 0 else recv(states, g, g.index - 1, "ring.states")
        if g.index < g.size - 1:
            send(_hop(rates, layout.chunks, n, H, dtype) * prefix + states, g, g.index + 1, "ring.states")
        out = torch.cat([intra[j] + inter_output(qs[j], prefix[j], rates) for j in range(n)])
        ctx.save_for_backward(q, k, v, prefix, rates if rates is not None else torch.empty(0))
        ctx.layout, ctx.g, ctx.block, ctx.has_rates = layout, g, block, rates is not None
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, prefix, rates = ctx.saved_tensors
        rates = rates if ctx.has_rates else None
        layout, g = ctx.layout, ctx.g
        dtype = acc_dtype(q.dtype)
        cu = layout.cu_seqlens().tolist()
        n, H = layout.n_seqs, q.shape[1]
        do = _split(dout.to(dtype), cu)
        with torch.enable_grad():
            qd, kd, vd = (t.detach().to(dtype).requires_grad_(True) for t in (q, k, v))
            pd = prefix.detach().requires_grad_(True)
            qs_, ks_, vs_ = _split(qd, cu), _split(kd, cu), _split(vd, cu)
            outs = [chunk_forward(qs_[j], ks_[j], vs_[j], rates, ctx.block) + inter_output(qs_[j], pd[j], rates)
                    for j in range(n)]
            states = torch.stack([chunk_state(ks_[j], vs_[j], rates) for j in range(n)])
            passed = _hop(rates, layout.chunks, n, H, dtype) * pd + states  # what went to rank r+1
        # gradient of the state sent forward comes back from rank r+1
        d_passed = torch.zeros_like(prefix) if g.index == g.size - 1 else recv(prefix, g, g.index + 1, "ring.grad")
        grads = torch.autograd.grad(outs + [passed], (qd, kd, vd, pd), list(do) + [d_passed], allow_unused=True)
        dq, dk, dv, dprefix = (torch.zeros_like(t) if gr is None else gr for gr, t in zip(grads, (qd, kd, vd, pd)))
        if g.index > 0:
            send(dprefix, g, g.index - 1, "ring.grad")
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackLayout, group: SPGroup,
                   decay_rates: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                   block: int = 256) -> torch.Tensor:
    """Causal linear attention over an SP group with the LASP-1 ring; same contract as lasp2_attention."""
    check_inputs("ring_attention", q, k, v, decay_rates)
    layout.check_local(q, "q", cu_seqlens)
    if layout.group_size != group.size:
        raise ValueError(f"ring_attention: the pack is laid out for {layout.group_size} ranks, the group has "
                         f"{group.size}")
    check_metadata(group, "ring_attention", {"q": q, "k": k, "v": v}, layout.lengths)
    rates = None if decay_rates is None else decay_rates.detach().to(device=q.device)
    return _Ring.apply(q, k, v, rates, layout, group, block)
