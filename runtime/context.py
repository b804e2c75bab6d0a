"""What the runtime attaches to a forward pass: the SP group, the pack's chunk layout and each
local token's position, and from them the SP operator every attention layer runs.

This is the one place where a comm operator is chosen (DeepSpeed's `DistributedAttention`
idea: the SP concern wraps any local attention). Models never import an operator; they call

    ctx.softmax_attention(q, k, v, scale)      # Ulysses or LASP-2H, as the plan says
    ctx.linear_attention(q, k, v, decay)       # LASP-2 or the LASP-1 ring (the baseline), as the plan says

on this rank's tokens ([local_tokens, heads, head_dim]). pliant's own model calls them from its
layers; Hugging Face models reach them through transformers' attention-function registry
(`runtime/hf.py`), which hands the registered function the q, k, v its layers computed with
the per-rank `position_ids` the context carries. With a group of one, both are plain
single-device attention over whole sequences.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pliant.comm import PackLayout, SPGroup, lasp2_attention, lasp2h_attention, ring_attention, ulysses_attention
from pliant.comm.gated_delta import causal_conv_pack, gated_delta_attention
from pliant.planner.plan import SOLO_FORM, SPForm

# the operator of each form the planner chooses; a group of one runs Ulysses' local path
SOFTMAX_OPS = {"ulysses": ulysses_attention, "lasp2h": lasp2h_attention, "none": ulysses_attention}
LINEAR_OPS = {"lasp2": lasp2_attention, "ring": ring_attention, "none": lasp2_attention}
# the gated delta rule's operator form for each linear form: LASP-2's gather, the ring, or the
# head all-to-all (Gated DeltaNet only: pliant's linear attention has no "heads" form)
GATED_DELTA_FORMS = {"lasp2": "gather", "ring": "ring", "heads": "heads", "none": "gather"}


@dataclass(frozen=True)
class SeqContext:
    """The pack this rank runs now: the SP group, the chunk layout, and each local token's
    position inside its own sequence (rotary embeddings, per-rank `position_ids`)."""

    group: SPGroup
    layout: PackLayout
    positions: torch.Tensor  # [local_tokens], int64
    form: SPForm = SOLO_FORM  # the operators the plan chose for this group

    def __post_init__(self):
        if self.form.softmax not in SOFTMAX_OPS or self.form.linear not in GATED_DELTA_FORMS:
            raise ValueError(f"SeqContext: unknown SP form {self.form} (softmax: {sorted(SOFTMAX_OPS)}, "
                             f"linear: {sorted(GATED_DELTA_FORMS)})")
        if (self.group.size == 1) != (self.form == SOLO_FORM):
            raise ValueError(f"SeqContext: a group of {self.group.size} cannot run as {self.form} (a group of one "
                             f"runs as {SOLO_FORM}, larger groups as the plan's form: CostModel.sp_form)")

    @classmethod
    def build(cls, group: SPGroup, lengths, device: torch.device | str = "cpu", form: SPForm = SOLO_FORM,
              layout: PackLayout | None = None) -> "SeqContext":
        """For a pack of sequences of `lengths` (or its `layout`, when the caller laid it out)."""
        layout = layout or PackLayout.from_lengths(lengths, group.size)
        pos = [torch.arange(group.index * c, (group.index + 1) * c, device=device) for c in layout.chunks]
        return cls(group, layout, torch.cat(pos), form)

    @property
    def max_length(self) -> int:
        """The longest sequence of the pack (a model's sliding window must cover it)."""
        return max(self.layout.lengths)

    def softmax_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          scale: float | None = None, layer: int | None = None) -> torch.Tensor:
        """Causal softmax attention of the pack, no attention across sequences; q [T, H, d],
        k, v [T, Hkv, d] (GQA) -> [T, H, d]. `layer` is for contexts that keep per-layer state
        (generation's decode cache); training attends within the pack and ignores it."""
        return SOFTMAX_OPS[self.form.softmax](q, k, v, self.layout, self.group, scale=scale)

    def linear_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         decay_rates: torch.Tensor | None) -> torch.Tensor:
        """Causal linear attention with per-head decay; state never flows between sequences."""
        if self.form.linear not in LINEAR_OPS:
            raise ValueError(f"SeqContext: linear attention has no {self.form.linear!r} form (it runs "
                             f"{sorted(LINEAR_OPS)}); the head all-to-all is for Gated DeltaNet layers")
        return LINEAR_OPS[self.form.linear](q, k, v, self.layout, self.group, decay_rates)

    def gated_delta(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                    scale: float | None = None, layer: int | None = None) -> torch.Tensor:
        """The gated delta rule (Gated DeltaNet layers) of the pack: q, k [T, H, dk] L2-normalised,
        v [T, H, dv], log decay g and write strength beta [T, H] -> [T, H, dv]. `layer` is for
        contexts with per-layer state (generation's CacheContext); training ignores it."""
        return gated_delta_attention(q, k, v, g, beta, self.layout, self.group, scale,
                                     GATED_DELTA_FORMS[self.form.linear])

    def short_conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   layer: int | None = None) -> torch.Tensor:
        """A depthwise causal convolution (weight [channels, kernel]) of x [T, channels] within
        each sequence, its window reaching into the ranks before."""
        return causal_conv_pack(x, weight, bias, self.layout, self.group)
