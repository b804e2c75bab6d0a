"""Pure-torch implementations of the fused kernels' contracts, so that the operators' fused
paths (the glue around the kernels: cu_seqlens, decay sign, scale, states, the bottom-right
causal alignment) are checked on CPU, where the kernels themselves cannot run.

- `fla_simple_gla_varlen`: `fla.ops.simple_gla.chunk_simple_gla`'s signature, computed by
  fla's own pure-torch `naive_recurrent_simple_gla` (fla-core, loaded from its file: the
  package's `fla.ops` imports triton) one sequence of `cu_seqlens` at a time. It works in
  float32, as the kernel accumulates.
- `flash_varlen`: `flash_attn.flash_attn_varlen_func`'s signature for the arguments pliant
  passes: per sequence, causal softmax with the mask aligned to the bottom right (flash-attn
  >= 2.1: query i of Lq sees keys up to i + Lk - Lq), GQA by repeating kv heads.
"""
from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path

import torch


@functools.lru_cache(maxsize=None)
def _fla_naive(op: str = "simple_gla", name: str = "naive_recurrent_simple_gla"):
    """fla's pure-torch reference `name` from fla/ops/<op>/naive.py, loaded from its file (the
    package's `fla.ops` imports triton)."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("fla-core is not installed (pip install fla-core): it holds the naive references")
    path = Path(list(spec.submodule_search_locations)[0]) / "ops" / op / "naive.py"
    mod_spec = importlib.util.spec_from_file_location(f"fla_{op}_naive", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return getattr(mod, name)


def fla_simple_gla_varlen(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False,
                          cu_seqlens=None, cu_seqlens_cpu=None, **kwargs):
    naive = _fla_naive()
    assert g is None and q.shape[0] == 1 and cu_seqlens is not None and not kwargs, "pliant's call shape"
    if cu_seqlens_cpu is not None:
        assert cu_seqlens_cpu.tolist() == cu_seqlens.tolist()
    H = q.shape[2]
    bounds = cu_seqlens.tolist()
    outs, states = [], []
    for j in range(len(bounds) - 1):
        a, b = bounds[j], bounds[j + 1]
        gate = torch.zeros(1, b - a, H, dtype=torch.float32) if g_gamma is None else \
            g_gamma.float().expand(1, b - a, H)
        h0 = None if initial_state is None else initial_state[j:j + 1].float()
        o, ht = naive(q[:, a:b], k[:, a:b], v[:, a:b], gate, scale=scale, initial_state=h0, output_final_state=True)
        outs.append(o)
        states.append(ht)
    return torch.cat(outs, dim=1), (torch.cat(states) if output_final_state else None)


def flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                 softmax_scale=None, causal=False, **kwargs):
    assert causal and dropout_p == 0.0 and not kwargs, "pliant's call shape"
    assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    assert max_seqlen_q == max(b - a for a, b in zip(cq, cq[1:]))
    assert max_seqlen_k == max(b - a for a, b in zip(ck, ck[1:]))
    H, Hkv = q.shape[1], k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    outs = []
    for j in range(len(cq) - 1):
        qs, ks, vs = q[cq[j]:cq[j + 1]], k[ck[j]:ck[j + 1]], v[ck[j]:ck[j + 1]]
        ks, vs = ks.repeat_interleave(H // Hkv, 1), vs.repeat_interleave(H // Hkv, 1)
        Lq, Lk = qs.shape[0], ks.shape[0]
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        visible = torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + (Lk - Lq)
        scores = scores.masked_fill(~visible, float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs))
    return torch.cat(outs)


def fla_gated_delta_varlen(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           cu_seqlens=None, cu_seqlens_cpu=None, **kwargs):
    """`fla.ops.gated_delta_rule.chunk_gated_delta_rule`'s signature for pliant's call shape,
    computed by fla's own `naive_recurrent_gated_delta_rule` one sequence at a time (float32)."""
    naive = _fla_naive("gated_delta_rule", "naive_recurrent_gated_delta_rule")
    assert q.shape[0] == 1 and cu_seqlens is not None and not kwargs, "pliant's call shape"
    assert g.dtype == torch.float32, "the log decay goes in float32"
    if cu_seqlens_cpu is not None:
        assert cu_seqlens_cpu.tolist() == cu_seqlens.tolist()
    bounds = cu_seqlens.tolist()
    outs, states = [], []
    for j in range(len(bounds) - 1):
        a, b = bounds[j], bounds[j + 1]
        h0 = None if initial_state is None else initial_state[j:j + 1]
        o, ht = naive(q[:, a:b], k[:, a:b], v[:, a:b], beta[:, a:b], g[:, a:b], scale=scale, initial_state=h0,
                      output_final_state=True)
        outs.append(o)
        states.append(ht)
    # fla returns o in q's dtype (rounded before pliant adds the entering state's part), states in float32
    return torch.cat(outs, dim=1).to(q.dtype), (torch.cat(states) if output_final_state else None)
