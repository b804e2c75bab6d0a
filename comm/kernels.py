"""Which kernels run the SP operators' local attention.

On CUDA, when installed (`pip install pliant[cuda]`), fused varlen kernels take a whole pack
in one call over its cumulative sequence lengths:

- linear attention (LASP-2, the ring): flash-linear-attention's `chunk_simple_gla`, the
  simple-GLA family whose per-head constant decay `g_gamma = log lambda_h = -s_h` is pliant's
  decay (float32, bfloat16, float16);
- the gated delta rule (Gated DeltaNet layers: LASP-2's chunk maps, the ring, the head
  all-to-all): flash-linear-attention's `chunk_gated_delta_rule` (float32, bfloat16, float16);
- softmax attention (Ulysses, LASP-2H): flash-attn's `flash_attn_varlen_func`, causal, with
  the mask aligned to the bottom right so that a rank's queries may start after the keys do
  (bfloat16, float16; head_dim up to 256; GQA natively).

Otherwise, and for float64, the torch path runs (comm/linear_blocks.py,
softmax_local.varlen_causal_attention): it is the fallback and the tests' oracle. Set
`PLIANT_KERNELS=torch` in the environment, or enter `torch_kernels()`, to force it;
`use_kernels(...)` runs other kernels with the same contracts.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Iterator

import torch

FUSED_LINEAR_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FUSED_SOFTMAX_DTYPES = (torch.bfloat16, torch.float16)
FLASH_MAX_HEAD_DIM = 256

_forced_torch = False
_chosen: dict[str, Callable] = {}


@functools.lru_cache(maxsize=None)
def _fla_chunk_simple_gla() -> Callable | None:
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception:  # not installed, or no triton / no GPU build: the torch path runs
        return None
    return chunk_simple_gla


@functools.lru_cache(maxsize=None)
def _fla_chunk_gated_delta() -> Callable | None:
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception:
        return None
    return chunk_gated_delta_rule


@functools.lru_cache(maxsize=None)
def _flash_attn_varlen() -> Callable | None:
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:
        return None
    return flash_attn_varlen_func


def _torch_only() -> bool:
    return _forced_torch or os.environ.get("PLIANT_KERNELS", "auto").lower() == "torch"


def _fused_linear(kind: str, q: torch.Tensor, load: Callable[[], Callable | None]) -> Callable | None:
    """The chosen kernel of `kind`, else fla's (`load`) where it runs for q, else None."""
    if _torch_only():
        return None
    if kind in _chosen:
        return _chosen[kind]
    if not q.is_cuda or q.dtype not in FUSED_LINEAR_DTYPES:
        return None
    return load()


def linear_kernel(q: torch.Tensor) -> Callable | None:
    """fla's `chunk_simple_gla` when it can compute this linear-attention call, else None."""
    return _fused_linear("linear", q, _fla_chunk_simple_gla)


def gated_delta_kernel(q: torch.Tensor) -> Callable | None:
    """fla's `chunk_gated_delta_rule` when it can compute this gated-delta call, else None."""
    return _fused_linear("gated_delta", q, _fla_chunk_gated_delta)


def softmax_kernel(q: torch.Tensor) -> Callable | None:
    """flash-attn's `flash_attn_varlen_func` when it can compute this softmax call, else None."""
    if _torch_only():
        return None
    if "softmax" in _chosen:
        return _chosen["softmax"]
    if not q.is_cuda or q.dtype not in FUSED_SOFTMAX_DTYPES or q.shape[-1] > FLASH_MAX_HEAD_DIM:
        return None
    return _flash_attn_varlen()


def kernel_names(q: torch.Tensor) -> dict[str, str]:
    """What runs for inputs like q: {'linear': ..., 'gated_delta': ..., 'softmax': ...} (logged by the
    runtime and the bench)."""
    return {"linear": "fla.chunk_simple_gla" if linear_kernel(q) else "torch",
            "gated_delta": "fla.chunk_gated_delta_rule" if gated_delta_kernel(q) else "torch",
            "softmax": "flash_attn_varlen_func" if softmax_kernel(q) else "torch"}


@contextlib.contextmanager
def torch_kernels() -> Iterator[None]:
    """Run the torch path inside this block, whatever is installed (the oracle of the fused paths)."""
    global _forced_torch
    before, _forced_torch = _forced_torch, True
    try:
        yield
    finally:
        _forced_torch = before


@contextlib.contextmanager
def use_kernels(linear: Callable | None = None, softmax: Callable | None = None,
                gated_delta: Callable | None = None) -> Iterator[None]:
    """Run these kernels inside this block, on any device and dtype: `linear` with
    `chunk_simple_gla`'s signature and contract, `gated_delta` with `chunk_gated_delta_rule`'s,
    `softmax` with `flash_attn_varlen_func`'s
    (another accelerator's build of them, or a reference implementation of their contract:
    the tests run fla's pure-torch naive recurrence through the operators on CPU)."""
    before = dict(_chosen)
    _chosen.update({k: f for k, f in (("linear", linear), ("softmax", softmax), ("gated_delta", gated_delta))
                    if f is not None})
    try:
        yield
    finally:
        _chosen.clear()
        _chosen.update(before)


def cumulative(lengths, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """[0, l0, l0 + l1, ...] on `device`: the cu_seqlens both kernel families take."""
    out = torch.zeros(len(lengths) + 1, dtype=dtype)
    out[1:] = torch.as_tensor(list(lengths), dtype=dtype).cumsum(0)
    return out.to(device)
