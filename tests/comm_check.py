"""Run an SP operator on a pool of ranks and compare outputs and gradients with the
single-process reference on the full sequences."""
from __future__ import annotations

from pliant.comm.linear_local import default_decay_rates
from pliant.comm.pack import PackLayout

from dist_jobs import make_inputs
from oracle import linear_attention_quadratic, softmax_attention

TOL = 1e-9
LINEAR = ("lasp2", "ring")


def reference(method, lengths, heads, kv_heads, dk, dv, seed, decay):
    rates = default_decay_rates(heads) if (decay and method in LINEAR) else None
    outs, grads = [], []
    for q, k, v, w in make_inputs(lengths, heads, kv_heads, dk, dv, seed):
        q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
        o = linear_attention_quadratic(q, k, v, rates) if method in LINEAR else softmax_attention(q, k, v)
        (o * w).sum().backward()
        outs.append(o.detach())
        grads.append((q.grad, k.grad, v.grad))
    return outs, grads


def check(pool, method, lengths, start, size, heads=2, kv_heads=None, dk=3, dv=None, seed=0, decay=True,
          options=None, tol=TOL):
    kv_heads = heads if kv_heads is None else kv_heads
    dv = (dk if method not in LINEAR else 4) if dv is None else dv
    results = pool.run("dist_jobs:run_op", method, lengths, start, size, heads, kv_heads, dk, dv, seed, decay,
                       options)
    mine = sorted((r for r in results if r is not None), key=lambda r: r[0])
    assert [r[0] for r in mine] == list(range(size))
    layout = PackLayout.from_lengths(lengths, size)
    ref_out, ref_grads = reference(method, lengths, heads, kv_heads, dk, dv, seed, decay)
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        got = layout.unshard([r[1 + i] for r in mine])
        want = ref_out if i == 0 else [g[i - 1] for g in ref_grads]
        for j, (a, b) in enumerate(zip(got, want)):
            err = (a - b).abs().max().item()
            assert err <= tol, f"{method} {name} of sequence {j} (length {lengths[j]}): max error {err:.3e}"
    return mine
