"""Single-process references for the SP attention operators, written independently of
pliant.comm: the plain quadratic (and recurrent) forms on the full sequences."""
from __future__ import annotations

import math

import torch


def linear_attention_quadratic(q, k, v, rates=None):
    """o_t = sum_{i<=t} lambda^(t-i) (q_t . k_i) v_i, one full sequence: q,k [L,H,dk], v [L,H,dv]."""
    L, H, _ = q.shape
    t = torch.arange(L, dtype=q.dtype)
    diff = t[:, None] - t[None, :]
    mask = (diff >= 0).to(q.dtype)
    if rates is None:
        decay = mask.unsqueeze(-1).expand(L, L, H)
    else:
        decay = torch.exp(-diff.clamp(min=0).unsqueeze(-1) * rates.to(q.dtype)) * mask.unsqueeze(-1)
    scores = torch.einsum("thd,shd->tsh", q, k) * decay
    return torch.einsum("tsh,she->the", scores, v)


def linear_attention_recurrent(q, k, v, rates=None):
    """The same, token by token: S <- lambda S + k^T v; o = q S."""
    L, H, dk = q.shape
    lam = torch.ones(H, dtype=q.dtype) if rates is None else torch.exp(-rates.to(q.dtype))
    S = torch.zeros(H, dk, v.shape[-1], dtype=q.dtype)
    out = []
    for i in range(L):
        S = lam.view(H, 1, 1) * S + torch.einsum("hd,he->hde", k[i], v[i])
        out.append(torch.einsum("hd,hde->he", q[i], S))
    return torch.stack(out)


def softmax_attention(q, k, v, scale=None):
    """Causal softmax attention of one full sequence; GQA by repeating kv heads. q [L,H,d], k,v [L,Hkv,d]."""
    L, H, d = q.shape
    rep = H // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    scores = torch.einsum("thd,shd->hts", q, k) * scale
    mask = torch.ones(L, L, dtype=torch.bool).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hts,shd->thd", torch.softmax(scores, dim=-1), v)


def gated_delta_recurrent(q, k, v, g, beta, scale):
    """The gated delta rule of one sequence, token by token from its definition (float64):
    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_t = S_t^T (scale q_t),
    alpha_t = exp(g_t); q, k [L, H, dk], v [L, H, dv], g, beta [L, H]. Returns (o, final S)."""
    L, H, dk = q.shape
    eye = torch.eye(dk, dtype=q.dtype)
    S = q.new_zeros(H, dk, v.shape[-1])
    outs = []
    for t in range(L):
        kk = k[t][:, :, None] @ k[t][:, None, :]  # [H, dk, dk]
        S = g[t].exp()[:, None, None] * ((eye - beta[t][:, None, None] * kk) @ S) \
            + beta[t][:, None, None] * (k[t][:, :, None] @ v[t][:, None, :])
        outs.append((S.transpose(-1, -2) @ (scale * q[t])[:, :, None])[..., 0])
    return torch.stack(outs), S
