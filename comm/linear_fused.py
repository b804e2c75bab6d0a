"""The local linear-attention compute by flash-linear-attention's fused varlen kernel.

`chunk_simple_gla(q, k, v, g_gamma=-s, scale=1, output_final_state=True, cu_seqlens=...)`
computes, for every sequence's chunk of the pack in one call, the intra-chunk output from a
zero state and the chunk's final state, which is pliant's memory state M_j (the recurrence
S_t = lambda S_(t-1) + k_t^T v_t, o_t = q_t S_t; g_gamma = log lambda_h = -s_h). Its
backward takes gradients for both, so the states' gradient from the other ranks (LASP-2's
dM, the ring's passed state) flows through the kernel too. The part of the incoming state
P_j, lambda^(t+1) q_t P_j, is a few batched ops in blocks (comm/linear_blocks.py), added
once P is known: LASP-2 gathers M before P exists.

`FusedLocalPack` has `LocalPack`'s interface; `local_pack` picks between them
(comm/kernels.py: fused on CUDA when installed, the torch path otherwise).
"""
from __future__ import annotations

from typing import Callable

import torch

from .kernels import cumulative, linear_kernel
from .linear_blocks import BlockLayout, LocalPack, choose_block, from_blocks, inter_blocks, prefix_entering, \
    prefix_grad, to_blocks
from .linear_local import acc_dtype, dense_fits, dense_pack


def _log_decay(rates: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if rates is None else (-rates.detach()).to(device=device, dtype=torch.float32)


def fused_pack(kernel: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: tuple[int, ...],
               rates: torch.Tensor | None) -> torch.Tensor:
    """A rank holding whole sequences (no SP): every sequence of the pack in one kernel call."""
    o, _ = kernel(q[None], k[None], v[None], g_gamma=_log_decay(rates, q.device), scale=1.0,
                  cu_seqlens=cumulative(lengths, q.device, torch.long),
                  cu_seqlens_cpu=cumulative(lengths, "cpu", torch.long))
    return o[0].to(q.dtype)


def one_rank(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: tuple[int, ...], group,
             rates: torch.Tensor | None) -> torch.Tensor | None:
    """A rank holding whole sequences (a group of one) needs no states passed: the fused kernel
    over the pack where it runs, else one masked product for a short pack; None otherwise (the
    operator's own path). LASP-2 and the ring share it."""
    kernel = linear_kernel(q)
    if group.size == 1 and kernel is not None:
        return fused_pack(kernel, q, k, v, lengths, rates)
    if dense_fits(group, q):
        return dense_pack(q, k, v, lengths, rates)
    return None


class FusedLocalPack:
    """A rank's local linear attention over its whole pack, by the fused kernel: `states()`
    (the chunks' memory states, sent to the other ranks), then `output(prefix)`; the
    kernel runs once, on first use, so that a backward's recomputation is differentiable."""

    def __init__(self, kernel: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 rates: torch.Tensor | None, chunks: tuple[int, ...], block: int):
        self.kernel, self.q, self.k, self.v = kernel, q, k, v
        self.dtype = acc_dtype(q.dtype)
        self.rates = None if rates is None else rates.to(dtype=self.dtype, device=q.device)
        self.g_gamma = _log_decay(rates, q.device)
        self.cu = cumulative(chunks, q.device, torch.long)
        self.cu_cpu = cumulative(chunks, "cpu", torch.long)
        self.bl = BlockLayout.build(chunks, q.device, choose_block(chunks, block, q.shape[-1]), self.dtype)
        self._intra: tuple[torch.Tensor, torch.Tensor] | None = None

    def _run(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._intra is None:
            o, ht = self.kernel(self.q[None], self.k[None], self.v[None], g_gamma=self.g_gamma, scale=1.0,
                                output_final_state=True, cu_seqlens=self.cu, cu_seqlens_cpu=self.cu_cpu)
            self._intra = (o[0].to(self.dtype), ht.to(self.dtype))
        return self._intra

    def states(self) -> torch.Tensor:
        return self._run()[1]

    def intra(self) -> None:
        self._run()

    def output(self, prefix: torch.Tensor | None) -> torch.Tensor:
        out = self._run()[0]
        if prefix is None:
            return out
        qb = to_blocks(self.q.to(self.dtype), self.bl)
        return out + from_blocks(inter_blocks(qb, prefix_entering(prefix, self.rates, self.bl), self.rates), self.bl)

    def prefix_grad(self, dout: torch.Tensor) -> torch.Tensor:
        qb = to_blocks(self.q.detach().to(self.dtype), self.bl)
        return prefix_grad(qb, to_blocks(dout, self.bl), self.rates, self.bl)


def local_pack(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rates: torch.Tensor | None,
               chunks: tuple[int, ...], block: int) -> LocalPack | FusedLocalPack:
    """The fused kernel's local pack where it runs (comm/kernels.py), else the torch one."""
    kernel = linear_kernel(q)
    if kernel is not None:
        return FusedLocalPack(kernel, q, k, v, rates, chunks, block)
    return LocalPack(q, k, v, rates, chunks, block)
