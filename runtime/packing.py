"""From whole token sequences to this rank's share of a pack: tokens, next-token targets
and the sequence context the model needs."""
from __future__ import annotations

import torch

from pliant.comm import PackLayout, SPGroup

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


def shard_pack(seqs: list[torch.Tensor], group: SPGroup, device: torch.device | str = "cpu",
               linear_sp: str = "lasp2") -> tuple[torch.Tensor, torch.Tensor, SeqContext]:
    """This rank's tokens and targets of a pack of whole sequences, and its SeqContext."""
    lengths = [len(s) for s in seqs]
    layout = PackLayout.from_lengths(lengths, group.size)
    tokens = layout.shard(seqs, group.index, pad_value=0).to(device)
    targets = layout.shard([next_token_targets(s) for s in seqs], group.index, pad_value=IGNORE).to(device)
    return tokens, targets, SeqContext.build(group, lengths, device, linear_sp)  # type: ignore[arg-type]
