"""LASP-2: sequence parallelism for linear attention with one AllGather of memory states.

Each rank of an SP group holds chunk r of every sequence of the pack. Forward:

1. per sequence, the chunk's memory state M_r = sum_tau lambda^(C-1-tau) k_tau^T v_tau
   (heads x dk x dv, accumulated in float32 or float64);
2. one AllGather of the states of all sequences (its size does not depend on the
   sequence lengths), issued asynchronously while the intra-chunk outputs are computed;
3. the state entering chunk r, P_r = sum_{c<r} lambda^(C (r-1-c)) M_c, and the output
   intra + lambda^(tau+1) q_t P_r.

Backward gathers dP_r = (lambda^(tau+1) q)^T dO (one AllGather again, overlapped with the
recomputation of the intra-chunk part) and each rank takes the suffix sum
dM_r = sum_{c>r} lambda^(C (c-1-r)) dP_c. States never cross from one sequence of the pack
into another: every sequence has its own slot in the gathered tensor.
"""
from __future__ import annotations

import torch

from .collectives import all_gather
from .groups import SPGroup
from .linear_local import (acc_dtype, chunk_decay, chunk_forward, dense_fits, dense_pack, load_linear, pack_outputs,
                           pack_states, prepare_linear, recompute_local, save_linear, split_pack)
from .pack import PackLayout


def _decayed_sum(gathered: torch.Tensor, lo: int, hi: int, hops: torch.Tensor, chunks: tuple[int, ...], rates,
                 dtype) -> torch.Tensor:
    """For every sequence j: sum over c in [lo, hi) of lambda^(C_j * hops[c - lo]) gathered[c, j]."""
    out = gathered.new_zeros(gathered.shape[1:])
    if hi <= lo:
        return out
    H = gathered.shape[2]
    for j in range(gathered.shape[1]):
        w = chunk_decay(rates, chunks[j], hops, dtype).expand(hi - lo, H)
        out[j] = torch.einsum("ch,chde->hde", w, gathered[lo:hi, j])
    return out


def _prefix(gathered: torch.Tensor, idx: int, chunks: tuple[int, ...], rates, dtype) -> torch.Tensor:
    """State entering chunk idx: P_idx = sum_{c < idx} lambda^(C (idx-1-c)) M_c, per sequence."""
    hops = torch.arange(idx - 1, -1, -1, device=gathered.device)
    return _decayed_sum(gathered, 0, idx, hops, chunks, rates, dtype)


def _suffix(gathered: torch.Tensor, idx: int, size: int, chunks: tuple[int, ...], rates, dtype) -> torch.Tensor:
    """Gradient of chunk idx's state: dM_idx = sum_{c > idx} lambda^(C (c-1-idx)) dP_c, per sequence."""
    hops = torch.arange(0, size - 1 - idx, device=gathered.device)
    return _decayed_sum(gathered, idx + 1, size, hops, chunks, rates, dtype)


class _Lasp2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rates, layout: PackLayout, g: SPGroup, block: int):
        dtype = acc_dtype(q.dtype)
        cu = layout.cu_seqlens().tolist()
        qs, ks, vs = (split_pack(t.to(dtype), cu) for t in (q, k, v))
        # the states first, so that their AllGather runs while the intra-chunk outputs are computed
        gathered, work = all_gather(pack_states(ks, vs, rates), g, "lasp2.states", async_op=True)
        intra = [chunk_forward(a, b, c, rates, block) for a, b, c in zip(qs, ks, vs)]
        if work is not None:
            work.wait()
        prefix = _prefix(gathered, g.index, layout.chunks, rates, dtype)
        save_linear(ctx, q, k, v, prefix, rates, layout, g, block)
        return torch.cat(pack_outputs(qs, ks, vs, prefix, rates, block, intra)).to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, prefix, rates, layout, g, dtype, cu = load_linear(ctx)
        do = split_pack(dout.to(dtype), cu)
        qs = split_pack(q.to(dtype), cu)
        # dP = (lambda^(tau+1) q)^T dO per sequence: gathered while the local part is recomputed
        dps = []
        for j in range(layout.n_seqs):
            C, H = qs[j].shape[0], qs[j].shape[1]
            scale = chunk_decay(rates, 1, torch.arange(1, C + 1, device=q.device), dtype).expand(C, H).unsqueeze(-1)
            dps.append(torch.einsum("thd,the->hde", scale * qs[j], do[j]))
        gathered, work = all_gather(torch.stack(dps), g, "lasp2.grad_states", async_op=True)
        leaves, outs, states = recompute_local(q, k, v, prefix, rates, ctx.block, cu, dtype)
        if work is not None:
            work.wait()
        dm = _suffix(gathered, g.index, g.size, layout.chunks, rates, dtype)
        grads = torch.autograd.grad(outs + [states], leaves, list(do) + [dm], allow_unused=True)
        dq, dk, dv = (torch.zeros_like(t) if gr is None else gr for gr, t in zip(grads, leaves))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def lasp2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackLayout, group: SPGroup,
                    decay_rates: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                    block: int = 256) -> torch.Tensor:
    """Causal linear attention of a packed set of sequences over an SP group (LASP-2).

    q, k: [local_tokens, heads, dk]; v: [local_tokens, heads, dv], this rank's chunks in the
    pack layout. decay_rates: [heads] rates s_h >= 0 (lambda_h = exp(-s_h)), fixed (not
    learned), or None for no decay. Returns [local_tokens, heads, dv].
    """
    rates = prepare_linear("lasp2_attention", q, k, v, layout, group, decay_rates, cu_seqlens)
    if dense_fits(group, q):  # one rank, a short pack: no states to pass
        return dense_pack(q, k, v, layout.lengths, rates)
    return _Lasp2.apply(q, k, v, rates, layout, group, block)
