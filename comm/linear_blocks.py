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
import torch.nn.functional as F

from .linear_local import acc_dtype

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
    """Where each local token sits in the [n_blocks, block] grid, what each block is, and the
    decay exponents every step needs, all built on the host in one piece (their torch ops do
    not grow with the sequences). Exponents are in the accumulation dtype."""

    block: int
    n_seqs: int
    n_blocks: int
    token_slot: torch.Tensor  # [T]: index into the flattened [n_blocks * block] grid
    block_seq: torch.Tensor  # [NB]: the block's sequence
    first: torch.Tensor  # [NB, 1, 1, 1]: 1.0 where a block is not its sequence's first (dtype)
    enter_exp: torch.Tensor  # [NB]: B x (the block's index in its sequence): the chunk's incoming state's decay
    state_exp: torch.Tensor  # [NB, B]: C_j - 1 - position (0 on empty slots): the chunk state's weights
    grad_exp: torch.Tensor  # [NB, B]: position + 1: the incoming state's gradient weights
    scan_exp: torch.Tensor  # [steps]: B x stride of each scan step
    shifts: tuple[int, ...]  # the scan's strides: 1, 2, 4, ... below the most blocks of a sequence
    same: tuple[torch.Tensor, ...]  # per stride d: [NB, 1, 1, 1] 1.0 where blocks b and b - d share a sequence

    @classmethod
    def build(cls, chunks: tuple[int, ...], device: torch.device | str, block: int,
              dtype: torch.dtype = torch.float32) -> "BlockLayout":
        c = np.asarray(chunks, dtype=np.int64)
        nb = -(-c // block)
        NB = int(nb.sum())
        boff = np.cumsum(nb) - nb
        cu = np.cumsum(c) - c
        tok_seq = np.repeat(np.arange(len(c)), c)
        pos = np.arange(int(c.sum())) - np.repeat(cu, c)
        token_slot = (boff[tok_seq] + pos // block) * block + pos % block
        block_seq = np.repeat(np.arange(len(c)), nb)
        block_index = np.arange(NB) - np.repeat(boff, nb)
        slot_pos = block_index[:, None] * block + np.arange(block)[None, :]  # [NB, B]
        state_exp = np.maximum(c[block_seq][:, None] - 1 - slot_pos, 0)
        shifts = tuple(2 ** i for i in range(max(0, math.ceil(math.log2(max(int(nb.max()), 1))))))
        same = [np.concatenate([np.zeros(d, bool), block_seq[d:] == block_seq[:-d]]) for d in shifts]

        def t(a, kind=None):
            return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=kind or dtype)

        return cls(block, len(c), NB, t(token_slot, torch.int64), t(block_seq, torch.int64),
                   t((block_index > 0).reshape(-1, 1, 1, 1)), t(block_index * block), t(state_exp),
                   t(slot_pos + 1), t(np.asarray(shifts, dtype=np.int64) * block), shifts,
                   tuple(t(m.reshape(-1, 1, 1, 1)) for m in same))


def to_blocks(x: torch.Tensor, bl: BlockLayout) -> torch.Tensor:
    """[T, H, d] -> [NB, B, H, d], zero where a block has no token."""
    grid = x.new_zeros((bl.n_blocks * bl.block,) + tuple(x.shape[1:]))
    return grid.index_copy(0, bl.token_slot, x).view((bl.n_blocks, bl.block) + tuple(x.shape[1:]))


def from_blocks(xb: torch.Tensor, bl: BlockLayout) -> torch.Tensor:
    """[NB, B, H, d] -> [T, H, d]."""
    return xb.reshape((bl.n_blocks * bl.block,) + tuple(xb.shape[2:])).index_select(0, bl.token_slot)


def decay_powers(rates: torch.Tensor | None, exponents: torch.Tensor, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """lambda_h ** e: exponents.shape + (heads,), in `dtype`."""
    if rates is None:
        return torch.ones(tuple(exponents.shape) + (heads,), dtype=dtype, device=exponents.device)
    return torch.exp(exponents.to(dtype).unsqueeze(-1) * -rates.to(dtype=dtype, device=exponents.device))


def intra_blocks(qb: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, rates: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every block attending to itself ([NB, B, H, dv]) and every block's end state A ([NB, H, dk, dv])."""
    NB, B, H, _ = qb.shape
    idx = torch.arange(B, device=qb.device)
    rel = idx[:, None] - idx[None, :]
    decay = decay_powers(rates, rel.clamp(min=0), H, qb.dtype) * (rel >= 0).unsqueeze(-1)  # [B, B, H]
    scores = torch.einsum("nthd,nshd->ntsh", qb, kb) * decay
    out = torch.einsum("ntsh,nshe->nthe", scores, vb)
    w_end = decay_powers(rates, B - 1 - idx, H, qb.dtype).unsqueeze(-1)  # lambda^(B-1-s): [B, H, 1]
    return out, torch.einsum("nshd,nshe->nhde", kb * w_end, vb)


def entering_states(ends: torch.Tensor, prefix: torch.Tensor | None, rates: torch.Tensor | None,
                    bl: BlockLayout) -> torch.Tensor:
    """S_b [NB, H, dk, dv]: the state entering each block from the earlier blocks of its own
    sequence (a segmented, decayed inclusive scan of the end states, shifted by one block) and
    from `prefix` [n, H, dk, dv], the state entering each sequence's chunk."""
    H = ends.shape[1]
    scan = ends
    if bl.shifts:
        hops = decay_powers(rates, bl.scan_exp, H, ends.dtype).view(len(bl.shifts), 1, H, 1, 1)
        for i, (d, same) in enumerate(zip(bl.shifts, bl.same)):
            scan = scan + F.pad(scan[:-d], (0, 0, 0, 0, 0, 0, d, 0)) * (hops[i] * same)
    entering = F.pad(scan[:-1], (0, 0, 0, 0, 0, 0, 1, 0)) * bl.first
    return entering if prefix is None else entering + prefix_entering(prefix, rates, bl)


def prefix_entering(prefix: torch.Tensor, rates: torch.Tensor | None, bl: BlockLayout) -> torch.Tensor:
    """The part of each block's entering state that comes from its chunk's incoming state:
    lambda^(B i_b) P_seq(b), [NB, H, dk, dv]."""
    H = prefix.shape[1]
    return decay_powers(rates, bl.enter_exp, H, prefix.dtype).view(-1, H, 1, 1) * prefix.index_select(0, bl.block_seq)


def inter_blocks(qb: torch.Tensor, entering: torch.Tensor, rates: torch.Tensor | None) -> torch.Tensor:
    """lambda^(t+1) q_t S_b for every block slot: [NB, B, H, dv]."""
    B, H = qb.shape[1], qb.shape[2]
    w = decay_powers(rates, torch.arange(1, B + 1, device=qb.device), H, qb.dtype).unsqueeze(-1)  # [B, H, 1]
    return torch.einsum("nthd,nhde->nthe", qb * w, entering)


def _per_sequence(per_block: torch.Tensor, bl: BlockLayout) -> torch.Tensor:
    out = per_block.new_zeros((bl.n_seqs,) + tuple(per_block.shape[1:]))
    return out.index_add(0, bl.block_seq, per_block)


def chunk_states(kb: torch.Tensor, vb: torch.Tensor, rates: torch.Tensor | None, bl: BlockLayout) -> torch.Tensor:
    """M_j = sum_tau lambda^(C_j-1-tau) k_tau^T v_tau for every sequence's chunk: [n, H, dk, dv]."""
    w = decay_powers(rates, bl.state_exp, kb.shape[2], kb.dtype).unsqueeze(-1)  # [NB, B, H, 1]
    return _per_sequence(torch.einsum("nshd,nshe->nhde", kb * w, vb), bl)


def prefix_grad(qb: torch.Tensor, dob: torch.Tensor, rates: torch.Tensor | None, bl: BlockLayout) -> torch.Tensor:
    """dP_j = sum_tau (lambda^(tau+1) q_tau)^T dO_tau for every sequence: [n, H, dk, dv]."""
    w = decay_powers(rates, bl.grad_exp, qb.shape[2], qb.dtype).unsqueeze(-1)
    return _per_sequence(torch.einsum("nthd,nthe->nhde", qb * w, dob), bl)


class LocalPack:
    """A rank's local linear attention over its whole pack, in blocks: the chunk states (sent
    to the other ranks first), the part that needs no incoming state, then the output once the
    state entering each chunk is known."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rates: torch.Tensor | None,
                 chunks: tuple[int, ...], block: int):
        dtype = acc_dtype(q.dtype)  # computed in float32 (float64 for float64 inputs), differentiably cast
        self.rates = None if rates is None else rates.to(dtype=dtype, device=q.device)
        self.bl = BlockLayout.build(chunks, q.device, choose_block(chunks, block, q.shape[-1]), dtype)
        self.qb, self.kb, self.vb = (to_blocks(t.to(dtype), self.bl) for t in (q, k, v))

    def states(self) -> torch.Tensor:
        return chunk_states(self.kb, self.vb, self.rates, self.bl)

    def intra(self) -> None:
        self.intra_out, self.ends = intra_blocks(self.qb, self.kb, self.vb, self.rates)

    def output(self, prefix: torch.Tensor | None) -> torch.Tensor:
        """[T, H, dv]: intra-block + the state entering each block (earlier blocks and `prefix`)."""
        if not hasattr(self, "intra_out"):
            self.intra()
        entering = entering_states(self.ends, prefix, self.rates, self.bl)
        return from_blocks(self.intra_out + inter_blocks(self.qb, entering, self.rates), self.bl)

    def prefix_grad(self, dout: torch.Tensor) -> torch.Tensor:
        """dP per sequence for `dout` [T, H, dv] (the gradient of the state entering each chunk)."""
        return prefix_grad(self.qb.detach(), to_blocks(dout, self.bl), self.rates, self.bl)
