"""Local causal softmax attention for one sequence, the piece Ulysses and LASP-2H run on each
rank. Queries may be a later slice of the sequence than the keys start at (LASP-2H: a rank's
chunk against all earlier chunks): query i sits at position q_offset + i and sees keys at
positions <= its own. torch SDPA on any device; long sequences are processed in query
blocks so the mask and scores stay bounded."""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from .kernels import cumulative, softmax_kernel

MAX_SCORES = 1 << 24  # query x key entries per SDPA call before blocking over queries


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int = 0,
                     scale: float | None = None, block: int = 1024) -> torch.Tensor:
    """q [Lq, H, d]; k, v [q_offset + Lq, Hkv, d] (GQA: H a multiple of Hkv). Returns [Lq, H, dv]."""
    Lq, H, d = q.shape
    Lk, Hkv = k.shape[0], k.shape[1]
    if Lk != q_offset + Lq:
        raise ValueError(f"causal_attention: {Lk} keys for {Lq} queries at offset {q_offset}")
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, L, d]
    if q_offset == 0:  # plain causal: SDPA's flash kernels (CPU and CUDA) never build the L x L scores
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
        return out.squeeze(0).transpose(0, 1)
    outs = []
    step = Lq if Lq * Lk <= MAX_SCORES else block
    for b0 in range(0, Lq, step):
        b1 = min(Lq, b0 + step)
        keys = q_offset + b1
        pos = torch.arange(q_offset + b0, q_offset + b1, device=q.device)
        mask = torch.arange(keys, device=q.device)[None, :] <= pos[:, None]
        outs.append(F.scaled_dot_product_attention(qh[:, :, b0:b1], kh[:, :, :keys], vh[:, :, :keys],
                                                   attn_mask=mask, scale=scale))
    return torch.cat(outs, dim=2).squeeze(0).transpose(0, 1)


def check_softmax_inputs(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    from .linear_local import SUPPORTED

    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in SUPPORTED:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported: float64, float32, bfloat16, float16")
        if t.dim() != 3:
            raise ValueError(f"{op}: {name} must be [tokens, heads, head_dim], got shape {tuple(t.shape)}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]) or k.shape[1] != v.shape[1] or q.shape[2] != k.shape[2]:
        raise ValueError(f"{op}: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{op}: {q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads (GQA)")


# ----- a whole pack at once: a few padded length buckets, one SDPA call each -----

MAX_BUCKETS = 8
BUCKET_COST = 256 ** 2  # a bucket's fixed cost (its call, its padding copies) in attention-score units


def length_buckets(lengths: list[int] | tuple[int, ...], max_buckets: int = MAX_BUCKETS) -> list[list[int]]:
    """Sequence indices grouped into at most `max_buckets` buckets of similar lengths, chosen
    (dynamic programming over the sorted distinct lengths) to minimise the padded attention
    work, sum over buckets of members x longest^2: compute stays close to the sum of the
    per-sequence work, and the number of attention calls does not grow with the sequences.
    Cached per pack: every layer of a step asks for the same lengths."""
    return [list(b) for b in _buckets(tuple(int(x) for x in lengths), max_buckets)]


@functools.lru_cache(maxsize=256)
def _buckets(lengths: tuple[int, ...], max_buckets: int) -> tuple[tuple[int, ...], ...]:
    distinct, counts = np.unique(np.asarray(lengths, dtype=np.int64), return_counts=True)
    n, K = len(distinct), min(max_buckets, len(distinct))
    members = np.concatenate([[0], np.cumsum(counts)]).astype(np.float64)  # sequences of the first i lengths
    square = distinct.astype(np.float64) ** 2
    best = np.full((K + 1, n + 1), np.inf)
    cut = np.zeros((K + 1, n + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for b in range(1, K + 1):
        for i in range(b, n + 1):  # the first i lengths in b buckets, the last bucket (j, i]
            j = np.arange(b - 1, i)
            cost = best[b - 1, j] + (members[i] - members[j]) * square[i - 1] + BUCKET_COST
            k = int(np.argmin(cost))
            best[b, i], cut[b, i] = cost[k], j[k]
    b, i, bounds = int(np.argmin(best[1:, n])) + 1, n, []
    while b > 0:
        j = int(cut[b, i])
        bounds.append((int(distinct[j]), int(distinct[i - 1])))
        i, b = j, b - 1
    arr = np.asarray(lengths)
    return tuple(tuple(int(s) for s in np.nonzero((arr >= lo) & (arr <= hi))[0]) for lo, hi in reversed(bounds))


def varlen_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int],
                            q_offsets: list[int] | None = None, scale: float | None = None) -> torch.Tensor:
    """Causal attention of every sequence of a pack with itself, in a constant number of calls.

    k, v [sum(keys), Hkv, d]: each sequence's keys, packed; q [sum(queries), H, d]: each
    sequence's queries, the last `lengths[j] - q_offsets[j]` positions of sequence j (LASP-2H:
    a rank's chunk after the chunks before it; default: all of them). On CUDA with flash-attn
    installed, one varlen kernel call (comm/kernels.py). Otherwise sequences are padded at
    their end into a few length buckets and each bucket is one SDPA call; padding sits after
    every real key, so causality keeps it out of every real query."""
    H, d = q.shape[1], q.shape[2]
    offsets = q_offsets or [0] * len(lengths)
    nq = [L - o for L, o in zip(lengths, offsets)]
    kernel = softmax_kernel(q)
    if kernel is not None:  # flash-attn varlen: causal aligned to the bottom right, so queries end with their keys
        return kernel(q, k, v, cumulative(nq, q.device, torch.int32), cumulative(lengths, q.device, torch.int32),
                      max(nq), max(lengths), softmax_scale=scale, causal=True)
    Hkv = k.shape[1]
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    kstart = [0]
    qstart = [0]
    for L, m in zip(lengths, nq):
        kstart.append(kstart[-1] + L)
        qstart.append(qstart[-1] + m)
    buckets = length_buckets(lengths)
    out = q.new_empty((q.shape[0], H, v.shape[2])) if len(buckets) > 1 else None
    pieces, rows = [], []
    for members in buckets:
        Lk = max(lengths[j] for j in members)
        Lq = max(nq[j] for j in members)
        n = len(members)
        flush = all(lengths[j] == Lk and nq[j] == Lq for j in members) and members == list(
            range(members[0], members[0] + n))
        if flush:  # equal lengths, adjacent in the pack: the bucket is a view, no padding copies
            k0, q0 = kstart[members[0]], qstart[members[0]]

            def grid(x, start, length):
                return x[start:start + n * length].view(n, length, H, x.shape[2]).transpose(1, 2)

            qb, kb, vb = grid(q, q0, Lq), grid(k, k0, Lk), grid(v, k0, Lk)
        else:
            # index arithmetic on the host (numpy), so that the torch ops do not grow with the sequences
            kidx = np.concatenate([np.arange(kstart[j], kstart[j + 1]) for j in members])
            kslot = np.concatenate([np.arange(lengths[j]) + i * Lk for i, j in enumerate(members)])
            qidx = np.concatenate([np.arange(qstart[j], qstart[j + 1]) for j in members])
            qslot = np.concatenate([np.arange(nq[j]) + i * Lq for i, j in enumerate(members)])
            kidx, kslot, qidx, qslot = (torch.from_numpy(t).to(q.device) for t in (kidx, kslot, qidx, qslot))

            def grid(x, idx, slot, length):
                g = x.new_zeros((n * length, H, x.shape[2]))
                return g.index_copy(0, slot, x.index_select(0, idx)).view(n, length, H, x.shape[2]).transpose(1, 2)

            qb, kb, vb = grid(q, qidx, qslot, Lq), grid(k, kidx, kslot, Lk), grid(v, kidx, kslot, Lk)
        if all(offsets[j] == 0 for j in members) and Lq == Lk:  # plain causal: SDPA's own mask, flash kernels
            ob = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale)
        else:  # queries start at their own offsets: key position <= the query's position in its sequence
            off = torch.tensor([offsets[j] for j in members], device=q.device)
            qpos = off[:, None] + torch.arange(Lq, device=q.device)[None, :]
            mask = torch.arange(Lk, device=q.device)[None, None, :] <= qpos[:, :, None]  # [n, Lq, Lk]
            ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask[:, None], scale=scale)
        flat = ob.transpose(1, 2).reshape(n * Lq, H, v.shape[2])
        if out is None:  # one bucket holding the whole pack in order
            return flat if flush else flat.index_select(0, qslot).index_select(0, torch.argsort(qidx))
        pieces.append(flat if flush else flat.index_select(0, qslot))
        rows.append(torch.arange(qstart[members[0]], qstart[members[0]] + n * Lq, device=q.device) if flush else qidx)
    return out.index_copy(0, torch.cat(rows), torch.cat(pieces))
