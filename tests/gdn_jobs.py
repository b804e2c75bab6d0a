"""Jobs for the gated delta rule's SP operators (tests/test_comm_gdn.py): inputs identical on
every rank and in the test process, each rank running its chunks."""
from __future__ import annotations

import torch

from pliant.comm import COUNTERS
from pliant.comm.pack import PackLayout


def gdn_inputs(lengths, heads, dk, dv, seed, decay="mixed"):
    """Per sequence: q, k (L2-normalised), v, g (log decay), beta, loss weights w; float64.
    decay: "mixed" (alpha in 0.3..1), "near0" (alpha ~ 1e-4) or "near1" (alpha ~ 1 - 1e-6)."""
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    out = []
    for L in lengths:
        q = torch.nn.functional.normalize(torch.randn(L, heads, dk, generator=gen, dtype=f64), dim=-1)
        k = torch.nn.functional.normalize(torch.randn(L, heads, dk, generator=gen, dtype=f64), dim=-1)
        v = torch.randn(L, heads, dv, generator=gen, dtype=f64)
        u = torch.rand(L, heads, generator=gen, dtype=f64)
        alpha = {"mixed": 0.3 + 0.7 * u, "near0": 1e-4 * (0.5 + u), "near1": 1 - 1e-6 * (0.5 + u)}[decay]
        beta = torch.rand(L, heads, generator=gen, dtype=f64)
        w = torch.randn(L, heads, dv, generator=gen, dtype=f64)
        out.append((q, k, v, alpha.log(), beta, w))
    return out


def run_gdn(ctx, form, lengths, start, size, heads, dk, dv, seed, decay, fused: bool = False):
    """This rank's outputs and input gradients (loss = sum(o * w)); None off-group. `fused`:
    in float32 through the fused-kernel path (FusedLocalGDN), with chunk_gated_delta_rule's
    contract computed by fla's own naive recurrence (tests/kernel_references.py)."""
    if not start <= ctx.rank < start + size:
        return None
    from pliant.comm.gated_delta import gated_delta_attention

    grp = ctx.registry.get(start, size)
    layout = PackLayout.from_lengths(lengths, size)
    seqs = gdn_inputs(lengths, heads, dk, dv, seed, decay)
    q, k, v, g, beta, w = (layout.shard([s[i] for s in seqs], grp.index) for i in range(6))
    import contextlib

    from pliant.comm.kernels import use_kernels

    from kernel_references import fla_gated_delta_varlen

    dtype = torch.float32 if fused else torch.float64
    leaves = [t.to(dtype).clone().requires_grad_(True) for t in (q, k, v, g, beta)]
    COUNTERS.reset()
    with use_kernels(gated_delta=fla_gated_delta_varlen) if fused else contextlib.nullcontext():
        out = gated_delta_attention(*leaves, layout, grp, scale=dk ** -0.5, form=form)
        (out * w.to(dtype)).sum().backward()
    return (grp.index, out.detach(), *[t.grad for t in leaves], COUNTERS.snapshot())


def run_halo_conv(ctx, lengths, start, size, channels, kernel, seed):
    """This rank's output and input gradient of the pack's causal convolution, and the weight's."""
    if not start <= ctx.rank < start + size:
        return None
    from pliant.comm.gated_delta import causal_conv_pack

    grp = ctx.registry.get(start, size)
    layout = PackLayout.from_lengths(lengths, size)
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(L, channels, generator=gen, dtype=torch.float64) for L in lengths]
    ws = [torch.randn(L, channels, generator=gen, dtype=torch.float64) for L in lengths]
    weight = torch.randn(channels, kernel, generator=gen, dtype=torch.float64, requires_grad=True)
    x = layout.shard(xs, grp.index).requires_grad_(True)
    w = layout.shard(ws, grp.index)
    out = causal_conv_pack(x, weight, None, layout, grp)
    (out * w).sum().backward()
    return grp.index, out.detach(), x.grad, weight.grad
