"""Gated DeltaNet layers of Hugging Face hybrid models (Qwen3.5, Qwen3-Next) under pliant's SP.

transformers' `Qwen3_5GatedDeltaNet.forward` runs its short causal convolution and the gated
delta rule over one whole batch row; under SP a rank holds chunks of many sequences, so both
need the other ranks (the convolution's window reaches into the chunk before, the state
flows from every earlier chunk). pliant swaps that forward, once when the model is loaded,
for one that keeps every projection, the gates and the gated RMSNorm transformers' own and
hands the two sequence-crossing pieces to the step's context, which runs the operator the
plan chose (comm/gated_delta.py):

    x -> in_proj_qkv (Qwen3-Next: in_proj_qkvz, in_proj_ba, regrouped by the layer's own
         fix_query_key_value_ordering) -> ctx.short_conv (halo from the rank before) -> silu -> q, k, v
      -> l2norm(q), l2norm(k) -> ctx.gated_delta(q, k, v, g, beta)   (LASP-2 form, or the ring)
      -> norm(o, z) -> out_proj

No state and no convolution window crosses a document boundary: both operators work per
sequence of the pack.
"""
from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F

GDN_CLASSES = ("Qwen3_5GatedDeltaNet", "Qwen3NextGatedDeltaNet")


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """fla's and transformers' L2 normalisation of q and k (eps inside the root)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def gdn_forward(self: nn.Module, hidden_states: torch.Tensor, cache=None, attention_mask=None, **kwargs):
    """The layer's forward with the SP core from the call's `pliant_ctx` (batch 1, packed)."""
    ctx = kwargs.get("pliant_ctx")
    if ctx is None:
        raise RuntimeError(f"{type(self).__name__} under pliant runs only with pliant_ctx= (a training step's "
                           f"SeqContext, or generation's CacheContext): HFCausalLM passes it")
    if hidden_states.shape[0] != 1:
        raise ValueError(f"pliant's Gated DeltaNet takes one packed sequence per call (batch 1), got "
                         f"{hidden_states.shape[0]}")
    x = hidden_states[0]
    T = x.shape[0]
    acc = torch.promote_types(x.dtype, torch.float32)  # the decay in at least float32, as transformers keeps it
    qkv, z, b, a = _projections(self, x)
    mixed = ctx.short_conv(qkv, self.conv1d.weight.squeeze(1), self.conv1d.bias, layer=self.layer_idx)
    mixed = F.silu(mixed) if self.activation == "silu" else getattr(F, self.activation)(mixed)
    q, k, v = torch.split(mixed, [self.key_dim, self.key_dim, self.value_dim], -1)
    q = l2norm(q.reshape(T, self.num_k_heads, self.head_k_dim))
    k = l2norm(k.reshape(T, self.num_k_heads, self.head_k_dim))
    v = v.reshape(T, self.num_v_heads, self.head_v_dim)
    if self.num_v_heads != self.num_k_heads:  # each q/k head serves consecutive value heads
        rep = self.num_v_heads // self.num_k_heads
        q, k = q.repeat_interleave(rep, 1), k.repeat_interleave(rep, 1)
    beta = b.sigmoid()
    g = -self.A_log.to(acc).exp() * F.softplus(a.to(acc) + self.dt_bias.to(acc))
    o = ctx.gated_delta(q, k, v, g, beta, scale=self.head_k_dim ** -0.5, layer=self.layer_idx)
    z = z.reshape(T * self.num_v_heads, self.head_v_dim)
    core = self.norm(o.reshape(T * self.num_v_heads, self.head_v_dim), z).reshape(1, T, self.value_dim)
    return self.out_proj(core)


def _projections(self: nn.Module, x: torch.Tensor):
    """The layer's input projections of x [T, hidden]: (q|k|v [T, 2 key_dim + value_dim] in the
    convolution's channel order, z [T, value_dim], b, a [T, v_heads]), by transformers' weights.
    Qwen3.5 projects each separately; Qwen3-Next fuses q, k, v, z and b, a per key-head group,
    which its own `fix_query_key_value_ordering` regroups."""
    if hasattr(self, "in_proj_qkvz"):
        T = x.shape[0]
        q, k, v, z, b, a = self.fix_query_key_value_ordering(self.in_proj_qkvz(x[None]), self.in_proj_ba(x[None]))
        qkv = torch.cat([t.reshape(T, -1) for t in (q, k, v)], -1)
        return qkv, z.reshape(T, -1), b.reshape(T, -1), a.reshape(T, -1)
    return self.in_proj_qkv(x), self.in_proj_z(x), self.in_proj_b(x), self.in_proj_a(x)


def attach_gdn(model: nn.Module) -> int:
    """Swap every Gated DeltaNet layer's forward for pliant's; returns how many."""
    n = 0
    for module in model.modules():
        if type(module).__name__ in GDN_CLASSES:
            module.forward = types.MethodType(gdn_forward, module)
            n += 1
    return n
