"""Local causal softmax attention for one sequence, the piece Ulysses and LASP-2H run on each
rank. Queries may be a later slice of the sequence than the keys start at (LASP-2H: a rank's
chunk against all earlier chunks): query i sits at position q_offset + i and sees keys at
positions <= its own. torch SDPA on any device; long sequences are processed in query
blocks so the mask and scores stay bounded."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_SCORES = 1 << 24  # query x key entries per SDPA call before blocking over queries


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int = 0,
                     scale: float | None = None, block: int = 1024) -> torch.Tensor:
    """q [Lq, H, d]; k, v [q_offset + Lq, Hkv, d] (GQA: H a multiple of Hkv). Returns [Lq, H, dv]."""
    Lq, H, d = q.shape
    Lk, Hkv = k.shape[0], k.shape[1]
    if Lk != q_offset + Lq:
        raise ValueError(f"causal_attention: {Lk} keys for {Lq} queries at offset {q_offset}")
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, L, d]
    if q_offset == 0:  # plain causal: SDPA's flash kernels (CPU and CUDA) never build the L x L scores
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
        return out.squeeze(0).transpose(0, 1)
    outs = []
    step = Lq if Lq * Lk <= MAX_SCORES else block
    for b0 in range(0, Lq, step):
        b1 = min(Lq, b0 + step)
        keys = q_offset + b1
        pos = torch.arange(q_offset + b0, q_offset + b1, device=q.device)
        mask = torch.arange(keys, device=q.device)[None, :] <= pos[:, None]
        outs.append(F.scaled_dot_product_attention(qh[:, :, b0:b1], kh[:, :, :keys], vh[:, :, :keys],
                                                   attn_mask=mask, scale=scale))
    return torch.cat(outs, dim=2).squeeze(0).transpose(0, 1)


def check_softmax_inputs(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    from .linear_local import SUPPORTED

    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in SUPPORTED:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported: float64, float32, bfloat16, float16")
        if t.dim() != 3:
            raise ValueError(f"{op}: {name} must be [tokens, heads, head_dim], got shape {tuple(t.shape)}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]) or k.shape[1] != v.shape[1] or q.shape[2] != k.shape[2]:
        raise ValueError(f"{op}: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{op}: {q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads (GQA)")
