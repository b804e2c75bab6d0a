"""From whole token sequences to this rank's share of a pack: tokens, next-token targets,
any per-token fields the caller's loss needs (the RL advantages, log-probs, masks), and the
sequence context the model needs. One layout per pack, built once."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from pliant.comm import PackLayout, SPGroup
from pliant.planner.plan import SOLO_FORM, SPForm

from .context import SeqContext

IGNORE = -100  # target of padding and of each sequence's last token


def next_token_targets(tokens: torch.Tensor) -> torch.Tensor:
    """Targets within one sequence: token t predicts token t+1; the last one predicts nothing."""
    out = torch.full_like(tokens, IGNORE)
    out[:-1] = tokens[1:]
    return out


def real_targets(lengths) -> int:
    """Tokens that have a target (all but each sequence's last): the loss normaliser."""
    return int(sum(max(0, int(L) - 1) for L in lengths))


@dataclass
class Pack:
    """This rank's share of a pack of whole sequences (rank r of the group holds chunk r of
    every sequence): tokens, targets (IGNORE on padding and wherever the caller set it), the
    caller's per-token fields sharded the same way, and the context the model runs under."""

    tokens: torch.Tensor  # [local_tokens]
    targets: torch.Tensor  # [local_tokens]
    ctx: SeqContext
    fields: dict[str, torch.Tensor] = field(default_factory=dict)  # each [local_tokens]


@dataclass
class Sequences:
    """Whole sequences as a loss needs them: token ids, targets (None: next-token targets) and
    per-token fields, each a tensor per sequence as long as it, padded with `pads[name]`
    (default 0). `shard` gives a rank its share."""

    tokens: Sequence[torch.Tensor]
    targets: Sequence[torch.Tensor] | None = None
    fields: dict[str, Sequence[torch.Tensor]] = field(default_factory=dict)
    pads: dict[str, float | int | bool] = field(default_factory=dict)

    def shard(self, group: SPGroup, device: torch.device | str = "cpu", form: SPForm = SOLO_FORM) -> "Pack":
        return shard_pack(self.tokens, group, device, form, self.targets, self.fields, self.pads)


def shard_pack(seqs: Sequence[torch.Tensor], group: SPGroup, device: torch.device | str = "cpu",
               form: SPForm = SOLO_FORM, targets: Sequence[torch.Tensor] | None = None,
               fields: Mapping[str, Sequence[torch.Tensor]] | None = None,
               pads: Mapping[str, float | int | bool] | None = None) -> Pack:
    """This rank's share of a pack of whole sequences under the group's SP `form` (the plan's
    choice). `targets` per sequence default to next-token targets; every entry of `fields`
    holds one tensor per sequence, as long as it, padded with `pads[name]` (default 0)."""
    lengths = [len(s) for s in seqs]
    layout = PackLayout.from_lengths(lengths, group.size)
    targets = targets if targets is not None else [next_token_targets(s) for s in seqs]
    pads = pads or {}
    shard = (lambda xs, pad: layout.shard(list(xs), group.index, pad_value=pad).to(device))
    return Pack(tokens=shard(seqs, 0), targets=shard(targets, IGNORE),
                ctx=SeqContext.build(group, lengths, device, form, layout=layout),
                fields={k: shard(v, pads.get(k, 0)) for k, v in (fields or {}).items()})
