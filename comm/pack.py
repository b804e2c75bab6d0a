"""The packed varlen layout an SP group works on (docs/architecture.md, data).

An SP group of s ranks receives a set of whole sequences. Each sequence is padded to a
multiple of s and cut into s contiguous chunks; rank r holds chunk r of every sequence,
concatenated in sequence order. `cu_seqlens` of the local tensor are therefore the
cumulative chunk lengths; padding sits at the end of each sequence's last chunk.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


class PackLayoutError(ValueError):
    """A pack whose tensors or cu_seqlens do not match its chunk layout."""


@dataclass(frozen=True)
class PackLayout:
    lengths: tuple[int, ...]  # real tokens per sequence
    group_size: int

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise PackLayoutError(f"group_size must be >= 1, got {self.group_size}")
        if not self.lengths:
            raise PackLayoutError("a pack needs at least one sequence")
        bad = [x for x in self.lengths if int(x) != x or x <= 0]
        if bad:
            raise PackLayoutError(f"sequence lengths must be positive integers, got {bad[:4]}")

    @classmethod
    def from_lengths(cls, lengths, group_size: int) -> "PackLayout":
        return cls(tuple(int(x) for x in lengths), int(group_size))

    @property
    def n_seqs(self) -> int:
        return len(self.lengths)

    @property
    def chunks(self) -> tuple[int, ...]:
        """Chunk length of each sequence: ceil(L / s)."""
        s = self.group_size
        return tuple(-(-L // s) for L in self.lengths)

    @property
    def padded(self) -> tuple[int, ...]:
        return tuple(c * self.group_size for c in self.chunks)

    @property
    def local_tokens(self) -> int:
        return sum(self.chunks)

    def cu_seqlens(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Offsets of each sequence's chunk in a rank's local tensor (length n_seqs + 1)."""
        out = torch.zeros(self.n_seqs + 1, dtype=torch.int64, device=device)
        out[1:] = torch.cumsum(torch.tensor(self.chunks, dtype=torch.int64), 0)
        return out

    def real_in_chunk(self, rank: int) -> tuple[int, ...]:
        """Real (non-padding) tokens of each sequence in chunk `rank`."""
        return tuple(max(0, min(c, L - rank * c)) for L, c in zip(self.lengths, self.chunks))

    def real_mask(self, rank: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Bool mask over a rank's local tokens: True for real tokens, False for padding."""
        parts = [torch.arange(c, device=device) < r for c, r in zip(self.chunks, self.real_in_chunk(rank))]
        return torch.cat(parts)

    def check_local(self, x: torch.Tensor, name: str, cu_seqlens: torch.Tensor | None = None) -> None:
        """Raise if a local tensor (tokens first) or given cu_seqlens disagree with the layout."""
        if x.shape[0] != self.local_tokens:
            raise PackLayoutError(
                f"{name} has {x.shape[0]} local tokens, but the pack's chunk layout gives {self.local_tokens} "
                f"(lengths {list(self.lengths)[:6]}{'...' if self.n_seqs > 6 else ''} padded to multiples of "
                f"group size {self.group_size})"
            )
        if cu_seqlens is not None:
            expect = self.cu_seqlens()
            got = cu_seqlens.detach().to("cpu", torch.int64)
            if got.shape != expect.shape or not torch.equal(got, expect):
                raise PackLayoutError(
                    f"cu_seqlens {got.tolist()[:8]} do not match the chunk layout {expect.tolist()[:8]} "
                    f"(each sequence padded to a multiple of {self.group_size}, one chunk per rank)"
                )

    # ----- moving between the full sequences and the per-rank chunks (tests, data loading) -----
    def shard(self, seqs: list[torch.Tensor], rank: int, pad_value: float | int = 0) -> torch.Tensor:
        """Rank `rank`'s local tensor from the full sequences (tokens first), padded with `pad_value`."""
        if len(seqs) != self.n_seqs:
            raise PackLayoutError(f"got {len(seqs)} sequences for a pack of {self.n_seqs}")
        out = []
        for x, L, c in zip(seqs, self.lengths, self.chunks):
            if x.shape[0] != L:
                raise PackLayoutError(f"a sequence has {x.shape[0]} tokens, the layout says {L}")
            piece = x[rank * c: min(L, (rank + 1) * c)]
            if piece.shape[0] < c:
                pad = x.new_full((c - piece.shape[0],) + tuple(x.shape[1:]), pad_value)
                piece = torch.cat([piece, pad])
            out.append(piece)
        return torch.cat(out)

    def unshard(self, locals_: list[torch.Tensor]) -> list[torch.Tensor]:
        """The full (unpadded) sequences from every rank's local tensor, in rank order."""
        if len(locals_) != self.group_size:
            raise PackLayoutError(f"got {len(locals_)} local tensors for a group of {self.group_size}")
        cu = self.cu_seqlens().tolist()
        seqs = []
        for j, L in enumerate(self.lengths):
            parts = [loc[cu[j]:cu[j + 1]] for loc in locals_]
            seqs.append(torch.cat(parts)[:L])
        return seqs
