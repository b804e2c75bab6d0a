"""The single-rank dense path of linear attention (a short pack in one masked product)
against the blockwise LASP-2 path it stands in for and the per-sequence reference: same
outputs and gradients in float64, across sequences of a pack (no attention across them)."""
from __future__ import annotations

import pytest
import torch

from pliant.comm import lasp2 as lasp2_mod
from pliant.comm import linear_local
from pliant.comm.groups import SOLO, SPGroup
from pliant.comm.lasp2 import lasp2_attention
from pliant.comm.linear_local import default_decay_rates, dense_fits
from pliant.comm.pack import PackLayout
from pliant.comm.ring import ring_attention

from oracle import linear_attention_quadratic



def inputs(lengths, heads=3, dk=4, dv=5, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q, k, v = (torch.randn(T, heads, d, generator=gen, dtype=dtype).requires_grad_(True) for d in (dk, dk, dv))
    w = torch.randn(T, heads, dv, generator=gen, dtype=dtype)
    return q, k, v, w


def grads(fn, q, k, v, w):
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v)
    (out * w).sum().backward()
    return out.detach(), [t.grad.clone() for t in (q, k, v)]


@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("op", [lasp2_attention, ring_attention])
def test_dense_equals_blockwise_and_reference(decay, op):
    lengths = (13, 1, 30, 7, 2)
    layout = PackLayout.from_lengths(lengths, 1)
    rates = default_decay_rates(3) if decay else None
    q, k, v, w = inputs(lengths)
    assert dense_fits(SOLO, q)
    dense_out, dense_g = grads(lambda a, b, c: op(a, b, c, layout, SOLO, rates), q, k, v, w)
    block_out, block_g = grads(lambda a, b, c: lasp2_mod._Lasp2.apply(a, b, c, rates, layout, SOLO, 8), q, k, v, w)

    def reference(a, b, c):
        outs, start = [], 0
        for L in lengths:
            outs.append(linear_attention_quadratic(a[start:start + L], b[start:start + L], c[start:start + L], rates))
            start += L
        return torch.cat(outs)

    ref_out, ref_g = grads(reference, q, k, v, w)
    for name, a, b in [("out", dense_out, block_out), *zip(("dq", "dk", "dv"), dense_g, block_g)]:
        assert (a - b).abs().max().item() < 1e-10, f"{name}: dense vs blockwise"
    for name, a, b in [("out", dense_out, ref_out), *zip(("dq", "dk", "dv"), dense_g, ref_g)]:
        assert (a - b).abs().max().item() < 1e-10, f"{name}: dense vs reference"
    # a change inside one sequence leaves the others' outputs as they were
    q2 = q.detach().clone()
    q2[14:44] += 1.0  # the third sequence
    out2 = op(q2, k.detach(), v.detach(), layout, SOLO, rates)
    assert torch.equal(out2[:14], dense_out[:14]) and torch.equal(out2[44:], dense_out[44:])
    assert not torch.equal(out2[14:44], dense_out[14:44])


def test_float32_accumulates_like_blockwise():
    lengths = (20, 9)
    layout = PackLayout.from_lengths(lengths, 1)
    q, k, v, _ = inputs(lengths, dtype=torch.float32)
    rates = default_decay_rates(3)
    a = lasp2_attention(q, k, v, layout, SOLO, rates)
    b = lasp2_mod._Lasp2.apply(q, k, v, rates, layout, SOLO, 256)
    assert a.dtype == torch.float32 and (a - b).abs().max().item() < 1e-4


def test_long_packs_and_groups_keep_the_blockwise_path(monkeypatch):
    lengths = (40, 40)
    q, _, _, _ = inputs(lengths)
    assert dense_fits(SOLO, q)
    monkeypatch.setattr(linear_local, "DENSE_MAX_ELEMENTS", 80 * 80 * 3 - 1)
    assert not dense_fits(SOLO, q)
    assert not dense_fits(SPGroup(0, 2, 0, None), q)
