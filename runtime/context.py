"""What the runtime attaches to a forward pass: the SP group, the pack's chunk layout and each
local token's position, and from them the SP operator every attention layer runs.

This is the one place where a comm operator is chosen (DeepSpeed's `DistributedAttention`
idea: the SP concern wraps any local attention). Models never import an operator; they call

    ctx.softmax_attention(q, k, v, scale)      # Ulysses, or LASP-2H when heads % group size != 0
    ctx.linear_attention(q, k, v, decay)       # LASP-2, or the LASP-1 ring (the baseline)

on this rank's tokens ([local_tokens, heads, head_dim]). pliant's own model calls them from its
layers; Hugging Face models reach them through transformers' attention-function registry
(`runtime/hf.py`), which hands the registered function the q, k, v its layers computed with
the per-rank `position_ids` the context carries. With a group of one, both are plain
single-device attention over whole sequences.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from pliant.comm import PackLayout, SPGroup, lasp2_attention, lasp2h_attention, ring_attention, ulysses_attention


@dataclass(frozen=True)
class SeqContext:
    """The pack this rank runs now: the SP group, the chunk layout, and each local token's
    position inside its own sequence (rotary embeddings, per-rank `position_ids`)."""

    group: SPGroup
    layout: PackLayout
    positions: torch.Tensor  # [local_tokens], int64
    linear_sp: Literal["lasp2", "ring"] = "lasp2"

    @classmethod
    def build(cls, group: SPGroup, lengths, device: torch.device | str = "cpu",
              linear_sp: Literal["lasp2", "ring"] = "lasp2") -> "SeqContext":
        layout = PackLayout.from_lengths(lengths, group.size)
        pos = [torch.arange(group.index * c, (group.index + 1) * c, device=device) for c in layout.chunks]
        return cls(group, layout, torch.cat(pos), linear_sp)

    def softmax_operator(self, heads: int) -> str:
        """Ulysses shards heads over the group; when they do not divide, LASP-2H gathers K and V."""
        return "ulysses" if heads % self.group.size == 0 else "lasp2h"

    @property
    def max_length(self) -> int:
        """The longest sequence of the pack (a model's sliding window must cover it)."""
        return max(self.layout.lengths)

    def softmax_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          scale: float | None = None, layer: int | None = None) -> torch.Tensor:
        """Causal softmax attention of the pack, no attention across sequences; q [T, H, d],
        k, v [T, Hkv, d] (GQA) -> [T, H, d]. `layer` is for contexts that keep per-layer state
        (generation's decode cache); training attends within the pack and ignores it."""
        op = ulysses_attention if self.softmax_operator(q.shape[1]) == "ulysses" else lasp2h_attention
        return op(q, k, v, self.layout, self.group, scale=scale)

    def linear_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         decay_rates: torch.Tensor | None) -> torch.Tensor:
        """Causal linear attention with per-head decay; state never flows between sequences."""
        op = ring_attention if self.linear_sp == "ring" else lasp2_attention
        return op(q, k, v, self.layout, self.group, decay_rates)
