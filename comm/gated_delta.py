"""Sequence parallelism for the gated delta rule (Gated DeltaNet layers: Qwen3.5, Qwen3-Next)
in LASP-2's form: one AllGather of per-chunk state maps, its size independent of length.

Per head, with L2-normalised q and k, decay alpha_t = exp(g_t) <= 1 and write strength
beta_t, the state S (dk x dv) follows

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,      o_t = S_t^T q_t

(transformers' recurrent form: decay, read k^T S, write beta (v - k^T S) along k). Over a
chunk the map from the entering state to the leaving one is affine, S_end = A S_start + B,
with A (dk x dk) the chunk's transition and B its state from a zero start. So, as LASP-2
does for plain linear attention:

1. each rank computes (A_r, B_r) of its chunk of every sequence of the pack;
2. one AllGather brings every rank all chunks' (A, B): heads x dk x (dk + dv) per sequence;
3. rank r folds its prefix, S_in = A_{r-1}(...(A_0 0 + B_0)...) + B_{r-1}, and computes its
   outputs from that entering state.

Backward gathers each rank's gradient of its entering state (heads x dk x dv per sequence),
and every rank runs the suffix scan G_c = dS_in_c + A_c^T G_{c+1} to get the gradient of the
state its chunk passed on: dB_r = G_{r+1}, dA_r = G_{r+1} S_in_r^T. States never cross from
one sequence of the pack into another: every sequence has its own slot in the gathered
tensor.

The local part (`chunk_gated_delta`) runs every sequence of a pack at once, padded into a
[sequences, heads, blocks, block, dim] batch and solved in blocks (the WY form fla and
transformers use: a unit-triangular solve per block, then a log-depth scan over blocks), so
its torch ops do not grow with the number of sequences and grow with the log of the length.
On CUDA, flash-linear-attention's `chunk_gated_delta_rule` runs it instead when installed
(`FusedLocalGDN`: varlen calls from a zero state, from the identity and from the entering
states; comm/kernels.py chooses), with the torch path as its oracle. `gdn_halo` gives each
rank the last k-1 inputs of the chunks before its own, for the layer's short causal
convolution.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .collectives import all_gather, check_call, recv, reduce_scatter, send
from .groups import SPGroup
from .kernels import cumulative, gated_delta_kernel
from .pack import PackLayout
from .ulysses import HeadExchange

SUPPORTED = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
BLOCK = 64


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_gdn_inputs(op: str, q, k, v, g, beta, layout: PackLayout, group: SPGroup) -> None:
    check_call(group, op, {"q": q, "k": k, "v": v, "g": g, "beta": beta}, layout.lengths,
               lambda: _check_gdn_local(op, q, k, v, g, beta, layout, group))


def _check_gdn_local(op: str, q, k, v, g, beta, layout: PackLayout, group: SPGroup) -> None:
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        if t.dtype not in SUPPORTED:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported: float64, float32, bfloat16, float16")
    if q.dim() != 3 or q.shape != k.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"{op}: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be [tokens, heads, "
                         f"dim] with q and k alike and v's tokens and heads theirs")
    if g.shape != q.shape[:2] or beta.shape != q.shape[:2]:
        raise ValueError(f"{op}: g {tuple(g.shape)} and beta {tuple(beta.shape)} must be [tokens, heads] = "
                         f"{tuple(q.shape[:2])}")
    layout.check_local(q, "q")
    if layout.group_size != group.size:
        raise ValueError(f"{op}: the pack is laid out for {layout.group_size} ranks, the group has {group.size}")


# ----- the local part: every sequence's chunk at once -----

def _chunk_index(chunks: tuple[int, ...], device) -> tuple[torch.Tensor, torch.Tensor]:
    """For every local token of the pack: its sequence and its offset within its chunk."""
    C = torch.tensor(chunks, device=device)
    seq = torch.repeat_interleave(torch.arange(len(chunks), device=device), C)
    pos = torch.arange(int(C.sum()), device=device) - torch.repeat_interleave(torch.cumsum(C, 0) - C, C)
    return seq, pos


def _to_blocks(x: torch.Tensor, index, n: int, width: int, dtype) -> torch.Tensor:
    """[T, H, *d] of the pack's chunks -> [n, H, width, *d], each chunk left-aligned, zero-padded."""
    out = x.new_zeros((n, width) + tuple(x.shape[1:]), dtype=dtype).index_put(index, x.to(dtype))
    return out.movedim(1, 2)


class LocalGDN:
    """The rank's chunks of a pack in block form: `A`, `B` each chunk's affine map of the state
    ([n, H, dk, dk], [n, H, dk, dv]); `output(S_in)` the outputs from entering states S_in."""

    def __init__(self, q, k, v, g, beta, chunks: tuple[int, ...], scale: float):
        dtype = acc_dtype(q.dtype)
        cmax = max(chunks)
        bs = min(BLOCK, cmax)
        nb = -(-cmax // bs)
        width = nb * bs
        self.dtype, self.index = dtype, _chunk_index(chunks, q.device)
        n = len(chunks)
        Q = _to_blocks(q * scale, self.index, n, width, dtype)  # [n, H, W, dk]
        K = _to_blocks(k, self.index, n, width, dtype)
        V = _to_blocks(v, self.index, n, width, dtype)
        G = _to_blocks(g, self.index, n, width, dtype)  # [n, H, W]; padding: g = 0
        Bt = _to_blocks(beta, self.index, n, width, dtype)  # padding: beta = 0 (an identity step)
        H, dk = Q.shape[1], Q.shape[-1]
        blk = (n, H, nb, bs)
        Q, K, V = Q.reshape(*blk, dk), K.reshape(*blk, dk), V.reshape(*blk, V.shape[-1])
        gc = G.reshape(blk).cumsum(-1)  # cumulative log-decay within each block
        Bt = Bt.reshape(blk)
        lower = torch.ones(bs, bs, dtype=torch.bool, device=q.device).tril()
        decay = (gc[..., :, None] - gc[..., None, :]).masked_fill(~lower, float("-inf")).exp()  # i >= j
        eye = torch.eye(bs, dtype=dtype, device=q.device)
        kb = K * Bt[..., None]
        # (I + M) U = beta V - (beta e^gc K) S0, M_ij = beta_i e^(gc_i - gc_j) k_i.k_j for j < i
        M = (kb @ K.transpose(-1, -2)) * decay * (1 - eye)
        rhs = torch.cat([V * Bt[..., None], kb * gc.exp()[..., None]], -1)
        sol = torch.linalg.solve_triangular(eye + M, rhs, upper=False, unitriangular=True)
        self.Uv, self.W = sol[..., :V.shape[-1]], sol[..., V.shape[-1]:]  # U = Uv - W S0
        P = (Q @ K.transpose(-1, -2)) * decay  # [.., bs, bs], i >= j
        self.Oq = Q * gc.exp()[..., None] - P @ self.W  # O = Oq S0 + P Uv
        self.PU = P @ self.Uv
        last = gc[..., -1:]
        Kd = K * (last - gc).exp()[..., None]
        self.A_blk = last.exp()[..., None] * torch.eye(dk, dtype=dtype, device=q.device) - Kd.transpose(-1, -2) @ self.W
        self.B_blk = Kd.transpose(-1, -2) @ self.Uv  # [n, H, nb, dk, dv]
        # each block's entering state as an affine map of the chunk's, S_b = Apre_b S_in + Bz_b: a
        # log-depth (Hillis-Steele) scan of the blocks' maps, (A2, B2) o (A1, B1) = (A2 A1, A2 B1 + B2),
        # on [A | B] side by side: one product A2 [A1 | B1] and B2 added to its right part per step
        AB = torch.cat([self.A_blk, self.B_blk], -1)  # [n, H, nb, dk, dk + dv]
        step = 1
        while step < nb:
            later = AB[:, :, step:]
            AB = torch.cat([AB[:, :, :step], later[..., :dk] @ AB[:, :, :-step] + F.pad(later[..., dk:], (dk, 0))], 2)
            step *= 2
        A, B = AB[..., :dk], AB[..., dk:]
        self.A, self.B = A[:, :, -1], B[:, :, -1]  # the chunk's map: [n, H, dk, dk], [n, H, dk, dv]
        eye = torch.eye(dk, dtype=dtype, device=q.device).expand(n, H, 1, dk, dk)
        self.Apre = torch.cat([eye, A[:, :, :-1]], 2)  # [n, H, nb, dk, dk]
        self.Bz = torch.cat([torch.zeros_like(B[:, :, :1]), B[:, :, :-1]], 2)  # [n, H, nb, dk, dv]

    def output(self, S_in: torch.Tensor | None) -> torch.Tensor:
        """Outputs [T, H, dv] from entering states S_in [n, H, dk, dv] (None: zero)."""
        S = self.Bz if S_in is None else self.Apre @ S_in[:, :, None] + self.Bz
        O = self.Oq @ S + self.PU  # [n, H, nb, bs, dv]
        n, H, nb, bs, dv = O.shape
        return O.reshape(n, H, nb * bs, dv).movedim(2, 1)[self.index]  # [T, H, dv]


class FusedLocalGDN:
    """`LocalGDN`'s interface by flash-linear-attention's fused varlen kernel
    (`chunk_gated_delta_rule`, every chunk of the pack in one call over cu_seqlens). One call
    from a zero state gives the outputs o0 and each chunk's B. With v = 0 the recurrence is
    linear in the state, so a call from the identity gives each chunk's transition A as its
    final state (made when first asked for: a group of one never needs it), and a call from the
    entering states S_in gives their part of the outputs, scale q A_t S_in, without a state per
    token. Every call is differentiable (the kernel's backward, dh0 included)."""

    def __init__(self, kernel: Callable, q, k, v, g, beta, chunks: tuple[int, ...], scale: float):
        self.dtype = torch.float32
        self._grad = torch.is_grad_enabled()  # the lazy calls below build graphs as this one does
        self._kernel, self._scale = kernel, scale
        self._cu = dict(cu_seqlens=cumulative(chunks, q.device, torch.long),
                        cu_seqlens_cpu=cumulative(chunks, "cpu", torch.long))
        self._qkgb = (q[None], k[None], g[None].float(), beta[None])
        self._shape = (len(chunks), q.shape[1], q.shape[2], v.shape[2])  # n, H, dk, dv
        q1, k1, g1, b1 = self._qkgb
        o0, B = kernel(q1, k1, v[None], g1, b1, scale=scale, output_final_state=True, **self._cu)
        self.o0, self.B = o0[0].float(), B.float()
        self._A: torch.Tensor | None = None

    def _from_state(self, state: torch.Tensor, width: int, final: bool):
        """The kernel with v = 0 (`width` wide) from `state` [n, H, dk, width]: (outputs, final state)."""
        q1, k1, g1, b1 = self._qkgb
        zeros = q1.new_zeros(q1.shape[:3] + (width,))
        with torch.set_grad_enabled(self._grad):
            return self._kernel(q1, k1, zeros, g1, b1, scale=self._scale, initial_state=state.float().contiguous(),
                                output_final_state=final, **self._cu)

    @property
    def A(self) -> torch.Tensor:
        if self._A is None:
            n, H, dk, _ = self._shape
            eye = torch.eye(dk, dtype=torch.float32, device=self.B.device).expand(n, H, dk, dk)
            self._A = self._from_state(eye, dk, True)[1].float()
        return self._A

    def output(self, S_in: torch.Tensor | None) -> torch.Tensor:
        if S_in is None:
            return self.o0
        return self.o0 + self._from_state(S_in, self._shape[3], False)[0][0].float()


def local_gdn(q, k, v, g, beta, chunks: tuple[int, ...], scale: float) -> LocalGDN | FusedLocalGDN:
    """The rank's chunks by the fused kernel where it runs (comm/kernels.py), else the torch path."""
    kernel = gated_delta_kernel(q)
    if kernel is not None:
        return FusedLocalGDN(kernel, q, k, v, g, beta, chunks, scale)
    return LocalGDN(q, k, v, g, beta, chunks, scale)


def chunk_gated_delta(q, k, v, g, beta, lengths: tuple[int, ...], scale: float,
                      initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole sequences of a pack on one rank: outputs [T, H, dv] (input dtype) and each
    sequence's final state [n, H, dk, dv] (accumulation dtype)."""
    local = local_gdn(q, k, v, g, beta, tuple(lengths), scale)
    out = local.output(initial_state)
    final = local.B if initial_state is None else local.A @ initial_state + local.B
    return out.to(v.dtype), final


# ----- LASP-2 form: one AllGather of (A, B) -----

def _fold(maps: torch.Tensor, r: int, dk: int) -> torch.Tensor | None:
    """The state entering chunk r from the gathered maps [s, n, H, dk, dk + dv]; None for r = 0."""
    S = None
    for c in range(r):
        A, B = maps[c, ..., :dk], maps[c, ..., dk:]
        S = B if S is None else A @ S + B
    return S


def _local_graph(q, k, v, g, beta, chunks: tuple[int, ...], scale: float):
    """The rank's local part built once, with its autograd graph on detached leaves: the forward
    of an operator below keeps it for its backward (no second forward of the local part)."""
    leaves = tuple(t.detach().requires_grad_(True) for t in (q, k, v, g, beta))
    with torch.enable_grad():
        return leaves, local_gdn(*leaves, chunks, scale)


def _outputs(local, S_in: torch.Tensor | None):
    """(leaf of the entering state or None, outputs) with the graph kept for backward."""
    with torch.enable_grad():
        S_leaf = None if S_in is None else S_in.detach().requires_grad_(True)
        return S_leaf, local.output(S_leaf)


def _input_grads(outputs, grads, leaves, extra=()) -> list:
    """Gradients of the leaves (and `extra` leaves) from the kept graph; zeros where unused."""
    wrt = (*leaves, *extra)
    got = torch.autograd.grad(outputs, wrt, grads, allow_unused=True)
    return [torch.zeros_like(t) if gr is None else gr for gr, t in zip(got, wrt)]


class _GatherGDN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, layout: PackLayout, grp: SPGroup, scale: float):
        leaves, local = _local_graph(q, k, v, g, beta, layout.chunks, scale)
        maps, _ = all_gather(torch.cat([local.A, local.B], -1).detach(), grp, "gdn.maps")
        dk = q.shape[-1]
        S_leaf, out = _outputs(local, _fold(maps, grp.index, dk))
        ctx.kept = (leaves, local, S_leaf, out, maps[..., :dk].clone())
        ctx.grp = grp
        return out.detach().to(v.dtype)

    @staticmethod
    def backward(ctx, dout):
        leaves, local, S_leaf, out, A_all = ctx.kept
        del ctx.kept
        grp = ctx.grp
        r, s = grp.index, grp.size
        do = dout.to(local.dtype)
        if S_leaf is None:
            d_in = torch.zeros_like(local.B)
        else:
            d_in = torch.autograd.grad(out, S_leaf, do, retain_graph=True)[0]
        d_all, _ = all_gather(d_in, grp, "gdn.grad_states")
        G = torch.zeros_like(d_in)  # gradient of the state leaving this rank's chunk
        for c in range(s - 1, r, -1):
            G = d_all[c] + A_all[c].transpose(-1, -2) @ G
        dA = G @ S_leaf.detach().transpose(-1, -2) if S_leaf is not None else torch.zeros_like(local.A)
        grads = _input_grads([out, local.A, local.B], [do, dA, G], leaves)
        return (*[gr.to(t.dtype) for gr, t in zip(grads, leaves)], None, None, None)


# ----- the ring: the state passed rank to rank (the LASP-1 baseline) -----

class _RingGDN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, layout: PackLayout, grp: SPGroup, scale: float):
        leaves, local = _local_graph(q, k, v, g, beta, layout.chunks, scale)
        S_in = None if grp.index == 0 else recv(local.B.detach(), grp, grp.index - 1, "gdn_ring.states")
        S_leaf, out = _outputs(local, S_in)
        with torch.enable_grad():
            passed = local.B if S_leaf is None else local.A @ S_leaf + local.B
        if grp.index < grp.size - 1:
            send(passed.detach(), grp, grp.index + 1, "gdn_ring.states")
        ctx.kept = (leaves, local, S_leaf, out, passed)
        ctx.grp = grp
        return out.detach().to(v.dtype)

    @staticmethod
    def backward(ctx, dout):
        leaves, local, S_leaf, out, passed = ctx.kept
        del ctx.kept
        grp = ctx.grp
        d_passed = torch.zeros_like(local.B) if grp.index == grp.size - 1 else \
            recv(local.B.detach(), grp, grp.index + 1, "gdn_ring.grad")
        extra = () if S_leaf is None else (S_leaf,)
        grads = _input_grads([out, passed], [dout.to(local.dtype), d_passed], leaves, extra)
        if S_leaf is not None:
            send(grads[-1], grp, grp.index - 1, "gdn_ring.grad")
        return (*[gr.to(t.dtype) for gr, t in zip(grads[:5], leaves)], None, None, None)


# ----- heads all-to-all (Ulysses on the GDN heads, as Megatron does): the baseline -----

def _heads_a2a(q, k, v, g, beta, layout: PackLayout, grp: SPGroup, scale: float) -> torch.Tensor:
    s, H = grp.size, q.shape[1]
    if H % s:
        raise ValueError(f"gated_delta_attention(form='heads'): {H} heads do not divide over an SP group of {s} "
                         f"ranks; the gather form (LASP-2) has no such bound")
    ex = HeadExchange(layout, grp, q.device)
    whole = [ex.to_sequences(x, "gdn_heads.in") for x in (q, k, v, g, beta)]
    o = chunk_gated_delta(*whole, tuple(c * s for c in layout.chunks), scale)[0]
    return ex.to_chunks(o, "gdn_heads.out")


FORMS = ("gather", "ring", "heads")


def gated_delta_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                          layout: PackLayout, group: SPGroup, scale: float | None = None,
                          form: str = "gather") -> torch.Tensor:
    """The gated delta rule of a packed set of sequences over an SP group.

    q, k [local_tokens, H, dk] (L2-normalised by the caller), v [local_tokens, H, dv], g
    [local_tokens, H] the log decay (<= 0), beta [local_tokens, H], this rank's chunks in the
    pack layout; `scale` multiplies q (default dk^-0.5). `form`: "gather" (LASP-2: one
    AllGather of chunk maps), "ring" (the state rank to rank) or "heads" (all-to-all to whole
    sequences over H / s heads). Returns [local_tokens, H, dv] in v's dtype."""
    op = f"gated_delta_attention[{form}]"
    if form not in FORMS:
        raise ValueError(f"gated_delta_attention: form {form!r}; one of {FORMS}")
    check_gdn_inputs(op, q, k, v, g, beta, layout, group)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if group.size == 1:
        return chunk_gated_delta(q, k, v, g, beta, layout.chunks, scale)[0]
    if form == "heads":
        return _heads_a2a(q, k, v, g, beta, layout, group, scale)
    fn = _GatherGDN if form == "gather" else _RingGDN
    return fn.apply(q, k, v, g, beta, layout, group, scale)


# ----- the short causal convolution's halo -----

class _GatherTails(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tails, grp: SPGroup):
        ctx.grp = grp
        return all_gather(tails, grp, "gdn.halo")[0]

    @staticmethod
    def backward(ctx, d):
        return reduce_scatter(d, ctx.grp, "gdn.halo_grad"), None


def gdn_halo(x: torch.Tensor, layout: PackLayout, group: SPGroup, width: int) -> torch.Tensor:
    """For every sequence of the pack, the `width` inputs just before this rank's chunk
    (zeros before the sequence's start): [n, width, *x.shape[1:]], differentiable (the
    gradient goes back to the ranks the inputs came from). x: [local_tokens, ...]."""
    n, chunks = layout.n_seqs, layout.chunks
    if width == 0 or group.size == 1:  # rank 0 of a group still joins the gather: its tails are others' halo
        return x.new_zeros((n, width) + tuple(x.shape[1:]))
    C = torch.tensor(chunks, device=x.device)
    ends = torch.cumsum(C, 0)
    # each rank's tail: the last `width` rows of each of its chunks, right-aligned, zeros in front
    off = torch.arange(width, device=x.device) - width  # -width .. -1
    src = ends[:, None] + off[None, :]  # [n, width]
    valid = off[None, :] >= -C[:, None]
    tails = torch.where(valid.reshape(n, width, *([1] * (x.dim() - 1))),
                        x[src.clamp(min=0)], x.new_zeros(()))
    gathered = _GatherTails.apply(tails.contiguous(), group)  # [s, n, width, ...]
    # halo row m of sequence j is global position r c_j - width + m: rank p // c_j, offset p % c_j
    p = group.index * C[:, None] + off[None, :]  # [n, width]
    owner = torch.div(p, C[:, None], rounding_mode="floor").clamp(min=0)
    row = (width - C[:, None] + (p - owner * C[:, None])).clamp(min=0, max=width - 1)
    halo = gathered[owner, torch.arange(n, device=x.device)[:, None], row]
    return torch.where((p >= 0).reshape(n, width, *([1] * (x.dim() - 1))), halo, x.new_zeros(()))


def causal_conv_pack(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layout: PackLayout,
                     group: SPGroup) -> torch.Tensor:
    """A depthwise causal convolution (weight [channels, kernel]) over each sequence of the
    pack, this rank's chunks of x [local_tokens, channels], with the halo from the ranks
    before; no window crosses a sequence's start. Returns [local_tokens, channels]."""
    width = weight.shape[-1] - 1
    halo = gdn_halo(x, layout, group, width)  # [n, width, C]
    C = torch.tensor(layout.chunks, device=x.device)
    # [halo_j ; chunk_j] of every sequence, one after the other: chunk row tau of sequence j
    # sits at base_j + width + tau
    seq, tau = _chunk_index(layout.chunks, x.device)
    base = torch.cumsum(C + width, 0) - (C + width)
    rows = x.new_zeros(int((C + width).sum()), x.shape[1])
    halo_idx = (base[:, None] + torch.arange(width, device=x.device)[None, :]).reshape(-1)
    chunk_idx = base[seq] + width + tau
    rows = rows.index_put((halo_idx,), halo.reshape(-1, x.shape[1])).index_put((chunk_idx,), x)
    out = bias.to(x.dtype).expand(x.shape[0], -1).clone() if bias is not None else torch.zeros_like(x)
    for m in range(width + 1):  # window tap m reads row t - width + m
        out = out + weight[:, m].to(x.dtype) * rows[chunk_idx - width + m]
    return out
