"""A decoder-only language model whose layer pattern mixes linear and softmax attention.

The model holds no parallelism (torchtitan's rule): every forward receives a `SeqContext`
(runtime/context.py) saying which SP group runs this pack and how it is laid out, and the
attention layers hand their q, k, v to it: the context, not the model, picks the SP operator
(LASP-2 for linear layers; Ulysses, or LASP-2H when the head count does not divide by the
group size, for softmax layers). With a group of one the same code is plain single-device
attention. Hugging Face models run under the same contract (runtime/hf.py).

Pieces: RMSNorm, SwiGLU MLP, rotary positions in softmax layers, GQA, per-head exponential
decay in linear layers (fixed rates, Lightning-attention style), an output RMSNorm per head
on linear layers (they have no softmax denominator to bound them).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pliant.comm.linear_local import default_decay_rates
from pliant.planner.spec import ModelSpec

from .context import SeqContext

__all__ = ["LM", "SeqContext", "lm_loss_sum", "rotary"]

ROPE_THETA = 10000.0  # what `pliant export` writes as rope_theta / rms_norm_eps for this model
RMS_EPS = 1e-6


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = RMS_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.gate = nn.Linear(hidden, ffn, bias=False)
        self.up = nn.Linear(hidden, ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float = ROPE_THETA) -> torch.Tensor:
    """Rotary position embedding of x [T, H, d] at integer positions [T] (half-split form)."""
    d = x.shape[-1]
    half = d // 2
    freqs = theta ** (-torch.arange(half, device=x.device, dtype=torch.float64) / half)
    angles = positions.to(torch.float64)[:, None] * freqs[None, :]  # [T, half]
    cos = torch.cos(angles).to(x.dtype)[:, None, :]
    sin = torch.sin(angles).to(x.dtype)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:2 * half]
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.cat([out, x[..., 2 * half:]], dim=-1) if d % 2 else out


class SoftmaxAttention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = spec.heads, spec.kv_heads, spec.head_dim
        self.q = nn.Linear(spec.hidden, spec.heads * spec.head_dim, bias=False)
        self.k = nn.Linear(spec.hidden, spec.kv_heads * spec.head_dim, bias=False)
        self.v = nn.Linear(spec.hidden, spec.kv_heads * spec.head_dim, bias=False)
        self.o = nn.Linear(spec.heads * spec.head_dim, spec.hidden, bias=False)

    def forward(self, x: torch.Tensor, ctx: SeqContext) -> torch.Tensor:
        T = x.shape[0]
        q = rotary(self.q(x).view(T, self.heads, self.head_dim), ctx.positions)
        k = rotary(self.k(x).view(T, self.kv_heads, self.head_dim), ctx.positions)
        v = self.v(x).view(T, self.kv_heads, self.head_dim)
        return self.o(ctx.softmax_attention(q, k, v).reshape(T, -1))


class LinearAttention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.heads, self.head_dim = spec.heads, spec.head_dim
        inner = spec.heads * spec.head_dim
        self.q = nn.Linear(spec.hidden, inner, bias=False)
        self.k = nn.Linear(spec.hidden, inner, bias=False)
        self.v = nn.Linear(spec.hidden, inner, bias=False)
        self.gate = nn.Linear(spec.hidden, inner, bias=False)
        self.norm = RMSNorm(spec.head_dim)
        self.o = nn.Linear(inner, spec.hidden, bias=False)
        rates = default_decay_rates(spec.heads) if spec.linear_decay else None
        self.register_buffer("decay_rates", rates, persistent=False)

    def forward(self, x: torch.Tensor, ctx: SeqContext) -> torch.Tensor:
        T = x.shape[0]
        q = F.silu(self.q(x)).view(T, self.heads, self.head_dim)
        k = F.silu(self.k(x)).view(T, self.heads, self.head_dim)
        v = self.v(x).view(T, self.heads, self.head_dim)
        o = ctx.linear_attention(q, k, v, self.decay_rates)
        o = self.norm(o).reshape(T, -1) * torch.sigmoid(self.gate(x))
        return self.o(o)


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, kind: str):
        super().__init__()
        self.kind = kind
        self.attn_norm = RMSNorm(spec.hidden)
        self.attn = SoftmaxAttention(spec) if kind == "softmax" else LinearAttention(spec)
        self.mlp_norm = RMSNorm(spec.hidden)
        self.mlp = SwiGLU(spec.hidden, spec.ffn_hidden)

    def forward(self, x: torch.Tensor, ctx: SeqContext) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), ctx)
        return x + self.mlp(self.mlp_norm(x))


class LM(nn.Module):
    """Tokens of this rank's pack [local_tokens] -> logits [local_tokens, vocab]."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab_size, spec.hidden)
        self.blocks = nn.ModuleList(Block(spec, kind) for kind in spec.layer_kinds())
        self.norm = RMSNorm(spec.hidden)
        self.head = nn.Linear(spec.hidden, spec.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
        for b in self.blocks:  # scale residual outputs down with depth (GPT-2)
            nn.init.normal_(b.attn.o.weight, std=std / (2 * len(self.blocks)) ** 0.5)
            nn.init.normal_(b.mlp.down.weight, std=std / (2 * len(self.blocks)) ** 0.5)

    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

    def forward(self, tokens: torch.Tensor, ctx: SeqContext) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, ctx)
        return self.head(self.norm(x))


def lm_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross entropy; targets of -100 (padding, a sequence's last token) count nothing.

    The caller divides by the real target tokens of the whole global batch, so that any plan
    gives the gradients of single-device training on the same batch.
    """
    return F.cross_entropy(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits,
                           targets, ignore_index=-100, reduction="sum")
