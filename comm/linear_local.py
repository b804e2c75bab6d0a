"""Local (single-rank) pieces of causal linear attention with per-head exponential decay.

For one sequence, token t attends to every earlier token i of the same sequence:

    o_t = sum_{i <= t} lambda_h^(t - i) (q_t . k_i) v_i,     lambda_h = exp(-s_h)

(the naive form of LASP-1 / Lightning attention; s_h = 0 is plain linear attention). A
rank holds one contiguous chunk of C tokens. Within it, the output splits into an
intra-chunk part and an inter-chunk part q_t (lambda^(tau+1)) S, where S is the state
carried in from earlier chunks; the chunk's own contribution to later chunks is its
memory state M = sum_tau lambda^(C-1-tau) k_tau^T v_tau. The SP operators compute both
for every sequence of a pack at once, in blocks (comm/linear_blocks.py); this module holds
the shared checks, the dense form for short single-rank packs, and the per-sequence state
the decoder's prefill uses.
"""
from __future__ import annotations

import torch

SUPPORTED = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """States are accumulated in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_decay_rates(heads: int) -> torch.Tensor:
    """Per-head decay rates s_h (lambda_h = exp(-s_h)): the ALiBi slopes 2^(-8(h+1)/H) that
    Lightning attention uses."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)], dtype=torch.float64)


def _powers(rates: torch.Tensor | None, exponents: torch.Tensor, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """lambda_h ** e for every exponent e (any shape) and head: shape exponents.shape + (heads,)."""
    e = exponents.to(dtype)
    if rates is None:
        return torch.ones(tuple(e.shape) + (heads,), dtype=dtype, device=e.device)
    return torch.exp(-e.unsqueeze(-1) * rates.to(dtype=dtype, device=e.device))


def chunk_state(k: torch.Tensor, v: torch.Tensor, rates: torch.Tensor | None) -> torch.Tensor:
    """The chunk's memory state M = sum_tau lambda^(C-1-tau) k_tau^T v_tau: [H, dk, dv]."""
    C, H, _ = k.shape
    w = _powers(rates, torch.arange(C - 1, -1, -1, device=k.device), H, k.dtype).unsqueeze(-1)
    return torch.einsum("thd,the->hde", w * k, v)


def check_inputs(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rates: torch.Tensor | None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in SUPPORTED:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported: float64, float32, bfloat16, float16")
        if t.dim() != 3:
            raise ValueError(f"{op}: {name} must be [tokens, heads, head_dim], got shape {tuple(t.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2] or q.shape[2] != k.shape[2]:
        raise ValueError(f"{op}: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree "
                         f"(tokens and heads must match; q and k share head_dim)")
    if rates is not None:
        if rates.shape != (q.shape[1],):
            raise ValueError(f"{op}: decay rates must have one entry per head ({q.shape[1]}), got {tuple(rates.shape)}")
        if bool((rates < 0).any()) or not bool(torch.isfinite(rates).all()):
            raise ValueError(f"{op}: decay rates must be finite and >= 0 (lambda = exp(-rate) <= 1)")



# ----- one rank holding whole sequences: a short pack in one masked product -----

DENSE_MAX_ELEMENTS = 1 << 22  # tokens^2 x heads of the score tensor (16 MiB in float32)


def dense_pack(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: tuple[int, ...],
               rates: torch.Tensor | None) -> torch.Tensor:
    """Every sequence of a pack attending to itself, as one [T, T, H] product masked to each
    sequence's causal block (the quadratic form of the same sum, differentiated by autograd).
    For a rank that holds whole sequences (no SP) and a pack short enough that T^2 H fits
    DENSE_MAX_ELEMENTS: one fused product instead of a few small ops per sequence, which is
    what many short sequences (RL responses, decoding prompts) are made of."""
    T, H, _ = q.shape
    dtype = acc_dtype(q.dtype)
    dev = q.device
    idx = torch.arange(T, device=dev)
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=dev), torch.tensor(lengths, device=dev))
    rel = idx[:, None] - idx[None, :]  # positions within a sequence are contiguous in the pack
    keep = (rel >= 0) & (seq[:, None] == seq[None, :])
    decay = _powers(rates, rel.clamp(min=0), H, dtype) * keep.unsqueeze(-1).to(dtype)
    scores = torch.einsum("thd,shd->tsh", q.to(dtype), k.to(dtype)) * decay
    return torch.einsum("tsh,she->the", scores, v.to(dtype)).to(q.dtype)


def dense_fits(group, q: torch.Tensor) -> bool:
    """A single-rank group and a pack short enough for dense_pack."""
    return group.size == 1 and q.shape[0] ** 2 * q.shape[1] <= DENSE_MAX_ELEMENTS


# ----- per-sequence states (the decoder's prefill) and the operators' saved context -----

def split_pack(x: torch.Tensor, cu: list[int]) -> list[torch.Tensor]:
    """The per-sequence chunks of a rank's local tensor."""
    return [x[cu[j]:cu[j + 1]] for j in range(len(cu) - 1)]


def pack_states(ks: list[torch.Tensor], vs: list[torch.Tensor], rates) -> torch.Tensor:
    """Memory states of every sequence's chunk: [n, H, dk, dv]."""
    return torch.stack([chunk_state(k, v, rates) for k, v in zip(ks, vs)])


def save_linear(ctx, q, k, v, prefix, rates, layout, g, block) -> None:
    ctx.save_for_backward(q, k, v, prefix, rates if rates is not None else torch.empty(0))
    ctx.layout, ctx.g, ctx.block, ctx.has_rates = layout, g, block, rates is not None


def load_linear(ctx):
    """(q, k, v, prefix, rates, layout, group, accumulation dtype) saved by save_linear."""
    q, k, v, prefix, rates = ctx.saved_tensors
    return q, k, v, prefix, rates if ctx.has_rates else None, ctx.layout, ctx.g, acc_dtype(q.dtype)


def prepare_linear(op: str, q, k, v, layout, group, decay_rates, cu_seqlens):
    """Validate a linear-attention call (inputs, pack layout, group, ranks agreeing); return the rates."""
    from .collectives import check_call

    def local() -> None:
        check_inputs(op, q, k, v, decay_rates)
        layout.check_local(q, "q", cu_seqlens)
        if layout.group_size != group.size:
            raise ValueError(f"{op}: the pack is laid out for {layout.group_size} ranks, the group has {group.size}")

    check_call(group, op, {"q": q, "k": k, "v": v}, layout.lengths, local)
    return None if decay_rates is None else decay_rates.detach().to(device=q.device)
