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
from .linear_blocks import decay_powers
from .linear_fused import local_pack, one_rank
from .linear_local import acc_dtype, load_linear, prepare_linear, save_linear
from .pack import PackLayout


def _decayed_sum(gathered: torch.Tensor, lo: int, hi: int, hops: torch.Tensor, chunks: tuple[int, ...], rates,
                 dtype) -> torch.Tensor:
    """For every sequence j: sum over c in [lo, hi) of lambda^(C_j * hops[c - lo]) gathered[c, j]."""
    if hi <= lo:
        return gathered.new_zeros(gathered.shape[1:])
    C = torch.tensor(chunks, device=gathered.device)
    w = decay_powers(rates, hops[:, None] * C[None, :], gathered.shape[2], dtype)  # [c, n, H]
    # a product and a sum, not an einsum: CPU bmm would loop over the (sequence, head) batch
    return (w[..., None, None] * gathered[lo:hi]).sum(0)


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
        local = local_pack(q, k, v, rates, layout.chunks, block)
        # the states first, so that their AllGather runs while the intra-chunk outputs are computed
        gathered, work = all_gather(local.states(), g, "lasp2.states", async_op=True)
        local.intra()
        if work is not None:
            work.wait()
        prefix = _prefix(gathered, g.index, layout.chunks, rates, dtype)
        save_linear(ctx, q, k, v, prefix, rates, layout, g, block)
        return local.output(prefix).to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, prefix, rates, layout, g, dtype = load_linear(ctx)
        do = dout.to(dtype)
        leaves = tuple(t.detach().requires_grad_(True) for t in (q, k, v))
        with torch.enable_grad():
            local = local_pack(*leaves, rates, layout.chunks, ctx.block)
        # dP = (lambda^(tau+1) q)^T dO per sequence: gathered while the local part is recomputed
        gathered, work = all_gather(local.prefix_grad(do), g, "lasp2.grad_states", async_op=True)
        with torch.enable_grad():
            out, states = local.output(prefix), local.states()
        if work is not None:
            work.wait()
        dm = _suffix(gathered, g.index, g.size, layout.chunks, rates, dtype)
        grads = torch.autograd.grad([out, states], leaves, [do, dm], allow_unused=True)
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
    out = one_rank(q, k, v, layout.lengths, group, rates)
    if out is not None:
        return out
    return _Lasp2.apply(q, k, v, rates, layout, group, block)
