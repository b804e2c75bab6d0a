"""A rank's chunks of a whole pack as one batch of blocks: the local linear-attention compute
for every sequence at once, in a number of torch ops that grows neither with the number of
sequences nor with their length.

Each sequence's chunk (C_j tokens on this rank, runtime layout) is cut into blocks of B
tokens, the last one zero-filled at its end; all blocks of all sequences form one
[NB, B, H, d] tensor (`to_blocks`, a scatter; `from_blocks`, its gather). Then, with
lambda_h = exp(-s_h) and a block's slots t, s in [0, B):

    intra-block  o_t  = sum_{s <= t} lambda^(t-s) (q_t . k_s) v_s           one batched product
    block state  A_b  = sum_s lambda^(B-1-s) k_s^T v_s                        (state at the block's end)
    entering     S_b  = sum_{b' < b, same sequence} lambda^(B (b-1-b')) A_b'  a segmented scan over
                        + lambda^(B i_b) P_seq                                blocks (log2 steps), plus
                                                                              the state entering the
                                                                              chunk (LASP-2, ring)
    inter        o_t += lambda^(t+1) q_t S_b
    chunk state  M_j  = sum_tau lambda^(C_j-1-tau) k_tau^T v_tau              (for the other ranks)

i_b is the block's index within its sequence. The zero-filled slots sit after a sequence's
last token, so they never reach a real token's output, and every exponent is >= 0. States
never cross sequences: the scan only adds blocks of the same sequence, and M is summed per
sequence. The block size adapts to the pack (`choose_block`): short sequences get short
blocks, so many short sequences cost about what one long one of the same tokens costs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

BLOCKS = (16, 32, 64, 128, 256)


def choose_block(chunks: tuple[int, ...], largest: int = 256, head_dim: int = 64) -> int:
    """The block size (a power of two up to `largest`) with the least work for these chunk
    lengths: intra-block products ~ blocks x B^2, states ~ blocks x B x head_dim."""
    c = np.asarray(chunks, dtype=np.int64)
    best, best_cost = BLOCKS[0], None
    for b in BLOCKS:
        if b > max(largest, BLOCKS[0]):
            break
        padded = int((-(-c // b) * b).sum())
        cost = padded * (b + 2 * head_dim)
        if best_cost is None or cost < best_cost:
            best, best_cost = b, cost
    return best


@dataclass(frozen=True)
class BlockLayout:
    """Where each local token sits in the [n_blocks, block] grid, and what each block is."""

    block: int
    n_seqs: int
    n_blocks: int
    token_slot: torch.Tensor  # [T]: index into the flattened [n_blocks * block] grid
    pos: torch.Tensor  # [T]: position of the token in its sequence's chunk
    tok_seq: torch.Tensor  # [T]: the token's sequence
    block_seq: torch.Tensor  # [NB]: the block's sequence
    block_index: torch.Tensor  # [NB]: the block's index within its sequence's chunk
    chunk: torch.Tensor  # [n]: chunk length of each sequence on this rank
    shifts: tuple[int, ...]  # the scan's strides: 1, 2, 4, ... below the most blocks of a sequence
    same: tuple[torch.Tensor, ...]  # per stride d: [NB] block b and b - d are of the same sequence

    @classmethod
    def build(cls, chunks: tuple[int, ...], device: torch.device | str, block: int) -> "BlockLayout":
        c = np.asarray(chunks, dtype=np.int64)
        nb = -(-c // block)
        boff = np.cumsum(nb) - nb
        cu = np.cumsum(c) - c
        tok_seq = np.repeat(np.arange(len(c)), c)
        pos = np.arange(int(c.sum())) - np.repeat(cu, c)
        token_slot = (boff[tok_seq] + pos // block) * block + pos % block
        block_seq = np.repeat(np.arange(len(c)), nb)
        block_index = np.arange(int(nb.sum())) - np.repeat(boff, nb)
        shifts = tuple(2 ** i for i in range(max(0, math.ceil(math.log2(max(int(nb.max()), 1))))))
        same = tuple(np.concatenate([np.zeros(min(d, len(block_seq)), bool),
                                     block_seq[d:] == block_seq[:-d]]) for d in shifts)

        def t(a, dtype=torch.int64):
            return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)

        return cls(block, len(c), int(nb.sum()), t(token_slot), t(pos), t(tok_seq), t(block_seq), t(block_index),
                   t(c), shifts, tuple(t(m, torch.bool) for m in same))


def to_blocks(x: torch.Tensor, bl: BlockLayout) -> torch.Tensor:
    """[T, H, d] -> [NB, B, H, d], zero where a block has no token."""
    grid = x.new_zeros((bl.n_blocks * bl.block,) + tuple(x.shape[1:]))
    return grid.index_copy(0, bl.token_slot, x).view((bl.n_blocks, bl.block) + tuple(x.shape[1:]))


def from_blocks(xb: torch.Tensor, bl: BlockLayout) -> torch.Tensor:
    """[NB, B, H, d] -> [T, H, d]."""
    return xb.reshape((bl.n_blocks * bl.block,) + tuple(xb.shape[2:])).index_select(0, bl.token_slot)


def decay_powers(rates: torch.Tensor | None, exponents: torch.Tensor, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """lambda_h ** e: exponents.shape + (heads,)."""
    e = exponents.to(dtype)
    if rates is None:
        return torch.ones(tuple(e.shape) + (heads,), dtype=dtype, device=e.device)
    return torch.exp(-e.unsqueeze(-1) * rates.to(dtype=dtype, device=e.device))


def intra_blocks(qb: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, rates: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every block attending to itself ([NB, B, H, dv]) and every block's end state A ([NB, H, dk, dv])."""
    NB, B, H, _ = qb.shape
    idx = torch.arange(B, device=qb.device)
    rel = idx[:, None] - idx[None, :]
    decay = decay_powers(rates, rel.clamp(min=0), H, qb.dtype) * (rel >= 0).unsqueeze(-1).to(qb.dtype)  # [B, B, H]
    scores = torch.einsum("nthd,nshd->ntsh", qb, kb) * decay
    out = torch.einsum("ntsh,nshe->nthe", scores, vb)
    w_end = decay_powers(rates, B - 1 - idx, H, qb.dtype).unsqueeze(-1)  # lambda^(B-1-s): [B, H, 1]
    return out, torch.einsum("nshd,nshe->nhde", kb * w_end, vb)


def entering_states(ends: torch.Tensor, prefix: torch.Tensor | None, rates: torch.Tensor | None,
                    bl: BlockLayout) -> torch.Tensor:
    """S_b [NB, H, dk, dv]: the state entering each block from the earlier blocks of its own
    sequence (a segmented, decayed inclusive scan of the end states, shifted by one block) and
    from `prefix` [n, H, dk, dv], the state entering each sequence's chunk."""
    H, dtype = ends.shape[1], ends.dtype
    scan = ends
    for d, same in zip(bl.shifts, bl.same):
        hop = decay_powers(rates, torch.tensor(bl.block * d, device=ends.device), H, dtype).view(1, H, 1, 1)
        shifted = torch.cat([scan.new_zeros((d,) + tuple(scan.shape[1:])), scan[:-d]])
        scan = scan + hop * shifted * same.view(-1, 1, 1, 1).to(dtype)
    first = bl.block_index == 0
    entering = torch.cat([scan.new_zeros((1,) + tuple(scan.shape[1:])), scan[:-1]]) * \
        (~first).view(-1, 1, 1, 1).to(dtype)
    if prefix is not None:
        entering = entering + decay_powers(rates, bl.block_index * bl.block, H, dtype).view(-1, H, 1, 1) * \
            prefix.index_select(0, bl.block_seq)
    return entering


def inter_blocks(qb: torch.Tensor, entering: torch.Tensor, rates: torch.Tensor | None) -> torch.Tensor:
    """lambda^(t+1) q_t S_b for every block slot: [NB, B, H, dv]."""
    B, H = qb.shape[1], qb.shape[2]
    w = decay_powers(rates, torch.arange(1, B + 1, device=qb.device), H, qb.dtype).unsqueeze(-1)  # [B, H, 1]
    return w * torch.einsum("nthd,nhde->nthe", qb, entering)


def chunk_states(k: torch.Tensor, v: torch.Tensor, rates: torch.Tensor | None, bl: BlockLayout) -> torch.Tensor:
    """M_j = sum_tau lambda^(C_j-1-tau) k_tau^T v_tau for every sequence's chunk: [n, H, dk, dv]."""
    H = k.shape[1]
    w = decay_powers(rates, bl.chunk.index_select(0, bl.tok_seq) - 1 - bl.pos, H, k.dtype).unsqueeze(-1)  # [T, H, 1]
    per_block = torch.einsum("nshd,nshe->nhde", to_blocks(w * k, bl), to_blocks(v, bl))
    out = per_block.new_zeros((bl.n_seqs,) + tuple(per_block.shape[1:]))
    return out.index_add(0, bl.block_seq, per_block)


def prefix_grad(q: torch.Tensor, dout: torch.Tensor, rates: torch.Tensor | None, bl: BlockLayout) -> torch.Tensor:
    """dP_j = sum_tau (lambda^(tau+1) q_tau)^T dO_tau for every sequence: [n, H, dk, dv]."""
    H = q.shape[1]
    w = decay_powers(rates, bl.pos + 1, H, q.dtype).unsqueeze(-1)
    per_block = torch.einsum("nthd,nthe->nhde", to_blocks(w * q, bl), to_blocks(dout, bl))
    out = per_block.new_zeros((bl.n_seqs,) + tuple(per_block.shape[1:]))
    return out.index_add(0, bl.block_seq, per_block)


class LocalPack:
    """A rank's local linear attention over its whole pack, in blocks: the chunk states (sent
    to the other ranks first), the part that needs no incoming state, then the output once the
    state entering each chunk is known."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rates: torch.Tensor | None,
                 chunks: tuple[int, ...], block: int):
        self.rates = rates
        self.bl = BlockLayout.build(chunks, q.device, choose_block(chunks, block, q.shape[-1]))
        self.q, self.k, self.v = q, k, v

    def states(self) -> torch.Tensor:
        return chunk_states(self.k, self.v, self.rates, self.bl)

    def intra(self) -> None:
        self.qb, kb, vb = (to_blocks(t, self.bl) for t in (self.q, self.k, self.v))
        self.intra_out, self.ends = intra_blocks(self.qb, kb, vb, self.rates)

    def output(self, prefix: torch.Tensor | None) -> torch.Tensor:
        """[T, H, dv]: intra-block + the state entering each block (earlier blocks and `prefix`)."""
        if not hasattr(self, "intra_out"):
            self.intra()
        entering = entering_states(self.ends, prefix, self.rates, self.bl)
        return from_blocks(self.intra_out + inter_blocks(self.qb, entering, self.rates), self.bl)
