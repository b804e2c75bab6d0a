"""Batched autoregressive generation with a decode cache, for both model kinds: pliant's own
`LM` (`Decoder`: keys and values of the softmax layers, and the recurrent state S of the
linear layers, S_t = lambda S_{t-1} + k_t^T v_t, o_t = q_t S_t: the recurrence LASP-2
computes by chunks) and a transformers causal LM (`HFDecoder`: keys and values, caught in
pliant's registered attention function; for Gated DeltaNet layers (Qwen3.5, Qwen3-Next) the
short convolution's last kernel - 1 inputs and the gated delta rule's state, caught in the
layer's SP core, runtime/gdn.py). `make_decoder` picks one; `generate` runs it.

The model is not changed for generation (it knows nothing of decoding, as it knows nothing
of parallelism): `Decoder` walks its modules one token per sequence per step; `HFDecoder`
runs the transformers model whole with a `CacheContext` where training passes a
`SeqContext`. Sequences sit in slots and step together; a finished slot is refilled with a
new prompt at once (continuous batching), so a long response does not hold up the slots of
short ones. The prompts of newly filled slots are prefilled together in one packed forward
(all but their last token, which the next step feeds), which fills their caches: the
softmax layers' keys and values, and each linear layer's state, the chunk state
sum_i lambda^(L-1-i) k_i^T v_i of the prompt. A response ends at any of the stop ids (a
tokenizer may have several: eos, end-of-turn) or at its max_new_tokens.
"""
from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from pliant.comm.gated_delta import causal_conv_pack, chunk_gated_delta
from pliant.comm.groups import SOLO
from pliant.comm.pack import PackLayout
from pliant.comm.linear_local import acc_dtype, pack_states, split_pack
from pliant.comm.softmax_local import causal_attention
from pliant.runtime.hf import HFCausalLM
from pliant.runtime.model import LM, LinearAttention, SeqContext, SoftmaxAttention, rotary


@dataclass
class Request:
    """One prompt to complete; `tag` is the caller's (returned with the completion)."""

    prompt: list[int]
    max_new_tokens: int
    tag: object = None
    # its own sampling stream (vLLM's per-request seed): its tokens then depend on the seed and
    # the model alone, not on what else the decoder holds or when it was added; None: the
    # decoder's generator, shared by the batch
    seed: int | None = None


@dataclass
class Completion:
    tag: object
    prompt: list[int]
    response: list[int]  # generated tokens, the stop token included when one was generated
    logprobs: list[float]  # the sampling policy's log-probability of each response token
    stopped: bool  # ended on a stop token (else on max_new_tokens)


@dataclass
class _Slot:
    request: Request
    fed: int = 0  # tokens of prompt + response consumed so far
    response: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    next_token: int | None = None
    gen: torch.Generator | None = None  # the request's own stream (Request.seed)


StopTokens = Union[int, Collection[int]]


def stop_set(stop_tokens: StopTokens) -> frozenset[int]:
    """The ids that end a response: a tokenizer may have several (eos, end-of-turn); none: every
    response runs to its max_new_tokens."""
    return frozenset([int(stop_tokens)] if isinstance(stop_tokens, int) else (int(t) for t in stop_tokens))


class SlotDecoder:
    """Continuous batching over `slots` slots, each up to `max_len` tokens (prompt + response):
    slot bookkeeping and sampling, shared by the decoders; a subclass owns the model's decode
    cache (`prefill`, `forward_step`, `_reset`)."""

    def __init__(self, model: nn.Module, slots: int, max_len: int, stop_tokens: StopTokens,
                 temperature: float = 1.0, generator: torch.Generator | None = None):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.model, self.n, self.max_len = model, slots, max_len
        self.stop = stop_set(stop_tokens)
        self.temperature, self.gen = temperature, generator
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.acc = acc_dtype(self.dtype)
        self.slots: list[_Slot | None] = [None] * slots

    # ----- slots -----
    def free_slots(self) -> int:
        return sum(s is None for s in self.slots)

    def active(self) -> int:
        return self.n - self.free_slots()

    def add(self, request: Request) -> None:
        if not request.prompt:
            raise ValueError("generation needs a prompt of at least one token")
        if len(request.prompt) + request.max_new_tokens > self.max_len:
            raise ValueError(f"prompt of {len(request.prompt)} tokens + max_new_tokens {request.max_new_tokens} "
                             f"exceeds the decoder's max_len {self.max_len}")
        i = self.slots.index(None)
        gen = None if request.seed is None else torch.Generator(device=self.device).manual_seed(request.seed)
        self.slots[i] = _Slot(request, gen=gen)
        self._reset(i)

    def _reset(self, slot: int) -> None:
        """Clear what a new sequence in `slot` would read of the last one's cache (keys and
        values need nothing: a sequence reads only positions it wrote)."""

    # ----- one step -----
    @torch.no_grad()
    def step(self) -> list[Completion]:
        """Every active slot consumes one token; returns the completions that ended."""
        fresh = [i for i, s in enumerate(self.slots) if s is not None and s.fed == 0 and len(s.request.prompt) > 1]
        if fresh:
            self.prefill(fresh)
        live = [i for i, s in enumerate(self.slots) if s is not None]
        if not live:
            return []
        tokens, pos = [], []
        for i in live:
            s = self.slots[i]
            p = s.request.prompt
            tokens.append(p[s.fed] if s.fed < len(p) else s.next_token)
            pos.append(s.fed)
        idx = torch.tensor(live, device=self.device)
        logits = self.forward_step(torch.tensor(tokens, device=self.device), torch.tensor(pos, device=self.device), idx)
        done, rows = [], []
        for row, i in enumerate(live):
            s = self.slots[i]
            s.fed += 1  # prefill left every slot at its prompt's last token: this step samples
            if s.request.max_new_tokens == 0:
                done.append(self._finish(i, stopped=False))
                continue
            rows.append(row)
        if not rows:
            return done
        logp = torch.log_softmax(logits[rows].to(self.acc) / self.temperature, dim=-1)
        picked = self._sample(logp.exp(), [self.slots[live[row]].gen for row in rows])
        toks, lps = picked.squeeze(1).tolist(), logp.gather(1, picked).squeeze(1).tolist()
        for row, tok, lp in zip(rows, toks, lps):
            i = live[row]
            s = self.slots[i]
            s.response.append(tok)
            s.logprobs.append(lp)
            s.next_token = tok
            if tok in self.stop or len(s.response) >= s.request.max_new_tokens:
                done.append(self._finish(i, stopped=tok in self.stop))
        return done

    def _sample(self, probs: torch.Tensor, gens: list[torch.Generator | None]) -> torch.Tensor:
        """One token per row: rows with a stream of their own draw from it, the others together
        from the decoder's generator."""
        shared = [r for r, g in enumerate(gens) if g is None]
        if len(shared) == len(gens):
            return torch.multinomial(probs, 1, generator=self.gen)
        picked = torch.empty(len(gens), 1, dtype=torch.long, device=probs.device)
        if shared:
            picked[shared] = torch.multinomial(probs[shared], 1, generator=self.gen)
        for r, g in enumerate(gens):
            if g is not None:
                picked[r] = torch.multinomial(probs[r], 1, generator=g)
        return picked

    def _finish(self, i: int, stopped: bool) -> Completion:
        s = self.slots[i]
        self.slots[i] = None
        return Completion(s.request.tag, s.request.prompt, s.response, s.logprobs, stopped)

    def prefill(self, slots: list[int]) -> None:
        raise NotImplementedError

    def forward_step(self, tokens: torch.Tensor, pos: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Decoder(SlotDecoder):
    """pliant's own `LM`, walked layer by layer: keys and values of its softmax layers, the
    state S of its linear ones."""

    def __init__(self, model: LM, slots: int, max_len: int, stop_tokens: StopTokens,
                 temperature: float = 1.0, generator: torch.Generator | None = None):
        super().__init__(model, slots, max_len, stop_tokens, temperature, generator)
        self._caches: list[dict[str, torch.Tensor]] = []
        for block in model.blocks:
            a = block.attn
            if isinstance(a, SoftmaxAttention):
                shape = (slots, max_len, a.kv_heads, a.head_dim)
                self._caches.append({"k": torch.zeros(shape, dtype=self.dtype, device=self.device),
                                     "v": torch.zeros(shape, dtype=self.dtype, device=self.device)})
            else:
                self._caches.append({"S": torch.zeros((slots, a.heads, a.head_dim, a.head_dim), dtype=self.acc,
                                                      device=self.device)})

    def _reset(self, slot: int) -> None:
        for c in self._caches:  # the linear state sums every earlier token: start it at zero
            if "S" in c:
                c["S"][slot].zero_()

    @torch.no_grad()
    def prefill(self, slots: list[int]) -> None:
        """Feed the prompts of `slots` (freshly added) but their last token, in one packed
        forward through the model's own layers, filling the caches as step-by-step feeding would."""
        m = self.model
        prompts = [self.slots[i].request.prompt[:-1] for i in slots]
        lengths = [len(p) for p in prompts]
        ctx = SeqContext.build(SOLO, lengths, self.device)
        x = m.embed(torch.tensor([t for p in prompts for t in p], device=self.device))
        cu = ctx.layout.cu_seqlens().tolist()
        T = x.shape[0]
        for block, cache in zip(m.blocks, self._caches):
            h = block.attn_norm(x)
            a = block.attn
            if isinstance(a, SoftmaxAttention):
                k = rotary(a.k(h).view(T, a.kv_heads, a.head_dim), ctx.positions)
                v = a.v(h).view(T, a.kv_heads, a.head_dim)
                for j, i in enumerate(slots):
                    cache["k"][i, :lengths[j]] = k[cu[j]:cu[j + 1]]
                    cache["v"][i, :lengths[j]] = v[cu[j]:cu[j + 1]]
            else:
                k = F.silu(a.k(h)).view(T, a.heads, a.head_dim).to(self.acc)
                v = a.v(h).view(T, a.heads, a.head_dim).to(self.acc)
                cache["S"][torch.tensor(slots, device=self.device)] = pack_states(
                    split_pack(k, cu), split_pack(v, cu), a.decay_rates)
            x = x + a(h, ctx)  # the layer's own forward on the pack
            x = x + block.mlp(block.mlp_norm(x))
        for i, n in zip(slots, lengths):
            self.slots[i].fed = n

    def forward_step(self, tokens: torch.Tensor, pos: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Logits [B, vocab] of one token per slot `idx` at positions `pos`."""
        m = self.model
        x = m.embed(tokens)
        for block, cache in zip(m.blocks, self._caches):
            h = block.attn_norm(x)
            a = block.attn
            if isinstance(a, SoftmaxAttention):
                h = self._softmax(a, h, pos, idx, cache)
            else:
                h = self._linear(a, h, idx, cache)
            x = x + h
            x = x + block.mlp(block.mlp_norm(x))
        return m.head(m.norm(x))

    def _softmax(self, a: SoftmaxAttention, x: torch.Tensor, pos: torch.Tensor, idx: torch.Tensor,
                 cache: dict[str, torch.Tensor]) -> torch.Tensor:
        B = x.shape[0]
        q = rotary(a.q(x).view(B, a.heads, a.head_dim), pos)
        k = rotary(a.k(x).view(B, a.kv_heads, a.head_dim), pos)
        v = a.v(x).view(B, a.kv_heads, a.head_dim)
        cache["k"][idx, pos] = k
        cache["v"][idx, pos] = v
        span = int(pos.max()) + 1
        keys, vals = cache["k"][idx, :span], cache["v"][idx, :span]  # [B, span, Hkv, d]
        if a.kv_heads != a.heads:
            keys = keys.repeat_interleave(a.heads // a.kv_heads, dim=2)
            vals = vals.repeat_interleave(a.heads // a.kv_heads, dim=2)
        mask = torch.arange(span, device=x.device)[None, :] <= pos[:, None]  # [B, span]
        out = F.scaled_dot_product_attention(q.unsqueeze(2), keys.transpose(1, 2), vals.transpose(1, 2),
                                             attn_mask=mask[:, None, None, :], scale=1.0 / math.sqrt(a.head_dim))
        return a.o(out.reshape(B, -1))

    def _linear(self, a: LinearAttention, x: torch.Tensor, idx: torch.Tensor,
                cache: dict[str, torch.Tensor]) -> torch.Tensor:
        B = x.shape[0]
        q = F.silu(a.q(x)).view(B, a.heads, a.head_dim).to(self.acc)
        k = F.silu(a.k(x)).view(B, a.heads, a.head_dim).to(self.acc)
        v = a.v(x).view(B, a.heads, a.head_dim).to(self.acc)
        S = cache["S"][idx]
        if a.decay_rates is not None:
            S = S * torch.exp(-a.decay_rates.to(device=x.device, dtype=self.acc)).view(1, -1, 1, 1)
        S = S + torch.einsum("bhd,bhe->bhde", k, v)
        cache["S"][idx] = S
        o = torch.einsum("bhd,bhde->bhe", q, S).to(x.dtype)
        o = a.norm(o).reshape(B, -1) * torch.sigmoid(a.gate(x))
        return a.o(o)


@dataclass(frozen=True)
class CacheContext:
    """What `HFDecoder` passes a transformers model as `pliant_ctx=` in place of a `SeqContext`:
    its softmax layers hand q, k, v (already rotated at `positions`) to `softmax_attention`,
    which writes k, v into the decode cache and attends over it; its Gated DeltaNet layers hand
    their convolution input to `short_conv` and q, k, v, g, beta to `gated_delta`, which keep
    each slot's last inputs and recurrent state. A call is either a prefill, whole prompts from
    position 0 packed together (causal, never across prompts), or a decode step, one token per
    slot at that slot's own position."""

    keys: list[torch.Tensor]  # per layer [slots, max_len, Hkv, d] (empty for a Gated DeltaNet layer)
    values: list[torch.Tensor]
    slots: torch.Tensor  # [T] the cache slot of each token of the call
    positions: torch.Tensor  # [T] each token's position in its own sequence
    lengths: tuple[int, ...]  # prefill: the prompts' lengths; decode: () (one token per slot)
    span: int  # keys the longest query attends to
    conv: list[torch.Tensor | None] = field(default_factory=list)  # per layer [slots, kernel - 1, channels]
    state: list[torch.Tensor | None] = field(default_factory=list)  # per layer [slots, H, dk, dv], accumulation dtype
    seq_slots: torch.Tensor | None = None  # prefill: each prompt's slot

    @classmethod
    def prefill(cls, keys: list[torch.Tensor], values: list[torch.Tensor], slots: list[int], lengths: list[int],
                device: torch.device, conv=(), state=()) -> "CacheContext":
        n = torch.tensor(lengths, device=device)
        positions = torch.cat([torch.arange(k, device=device) for k in lengths])
        seq_slots = torch.tensor(slots, device=device)
        return cls(keys, values, seq_slots.repeat_interleave(n), positions, tuple(lengths), max(lengths),
                   list(conv), list(state), seq_slots)

    @classmethod
    def decode(cls, keys: list[torch.Tensor], values: list[torch.Tensor], slots: torch.Tensor,
               positions: torch.Tensor, conv=(), state=()) -> "CacheContext":
        return cls(keys, values, slots, positions, (), int(positions.max()) + 1, list(conv), list(state))

    def short_conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   layer: int | None = None) -> torch.Tensor:
        """A Gated DeltaNet layer's depthwise causal convolution (weight [channels, kernel]) of
        x [T, channels]: prefill, within each prompt, keeping its last kernel - 1 inputs (zeros
        before its start); decode, over each slot's kept inputs and this token."""
        cache = self.conv[layer]
        width = weight.shape[-1] - 1
        if self.lengths:
            out = causal_conv_pack(x, weight, bias, PackLayout.from_lengths(self.lengths, 1), SOLO)
            n = torch.tensor(self.lengths, device=x.device)
            off = torch.arange(width, device=x.device) - width
            rows = torch.cumsum(n, 0)[:, None] + off[None, :]  # [prompts, width]
            tails = torch.where((off[None, :] >= -n[:, None])[..., None], x[rows.clamp(min=0)], x.new_zeros(()))
            cache[self.seq_slots] = tails.to(cache.dtype)
            return out
        window = torch.cat([cache[self.slots].to(x.dtype), x[:, None]], 1)  # [B, kernel, channels]
        cache[self.slots] = window[:, 1:].to(cache.dtype)
        out = torch.einsum("bkc,ck->bc", window, weight.to(x.dtype))
        return out if bias is None else out + bias.to(x.dtype)

    def gated_delta(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                    scale: float | None = None, layer: int | None = None) -> torch.Tensor:
        """The gated delta rule: prefill, each prompt from a zero state (the chunked form, its
        final state kept); decode, one step of the recurrence per slot from its kept state:
        S <- e^g S; S <- S + k^T (beta (v - k S)); o = scale q S."""
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        cache = self.state[layer]
        if self.lengths:
            out, final = chunk_gated_delta(q, k, v, g, beta, self.lengths, scale)
            cache[self.seq_slots] = final.to(cache.dtype)
            return out
        acc = cache.dtype
        S = cache[self.slots] * g.to(acc).exp()[..., None, None]  # [B, H, dk, dv]
        kt = k.to(acc)
        delta = (v.to(acc) - torch.einsum("bhk,bhkv->bhv", kt, S)) * beta.to(acc)[..., None]
        S = S + kt[..., :, None] * delta[..., None, :]
        cache[self.slots] = S
        return torch.einsum("bhk,bhkv->bhv", q.to(acc) * scale, S).to(v.dtype)

    @property
    def max_length(self) -> int:
        """The longest sequence any query sees (the sliding-window check of `pliant_attention`)."""
        return self.span

    def softmax_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                          layer: int | None = None) -> torch.Tensor:
        """q [T, H, d], k, v [T, Hkv, d] of layer `layer` -> [T, H, d]."""
        if layer is None:
            raise ValueError("decoding needs the attention layer's index (pliant_attention passes module.layer_idx)")
        ck, cv = self.keys[layer], self.values[layer]
        ck[self.slots, self.positions] = k
        cv[self.slots, self.positions] = v
        if self.lengths:  # the prompts' own keys are all they see
            out, start = [], 0
            for n in self.lengths:
                out.append(causal_attention(q[start:start + n], k[start:start + n], v[start:start + n], 0, scale))
                start += n
            return torch.cat(out)
        return cached_attention(q, ck[self.slots, :self.span], cv[self.slots, :self.span], self.positions, scale)


def cached_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor,
                     scale: float | None) -> torch.Tensor:
    """One query per row at position `pos` over its slot's cached keys [B, span, Hkv, d] up to
    that position (GQA: kv heads repeated) -> [B, H, d]."""
    B, H, d = q.shape
    if keys.shape[2] != H:
        keys = keys.repeat_interleave(H // keys.shape[2], dim=2)
        values = values.repeat_interleave(H // values.shape[2], dim=2)
    mask = torch.arange(keys.shape[1], device=q.device)[None, :] <= pos[:, None]  # [B, span]
    out = F.scaled_dot_product_attention(q.unsqueeze(2), keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=mask[:, None, None, :],
                                         scale=1.0 / math.sqrt(d) if scale is None else scale)
    return out.squeeze(2)


class HFDecoder(SlotDecoder):
    """A transformers causal LM (`HFCausalLM`), run whole, unchanged, with its attention
    through pliant's registered function: the decode cache is the keys and values that
    function receives (`CacheContext`), so RoPE, biases and q/k norms stay transformers' own."""

    def __init__(self, model: HFCausalLM, slots: int, max_len: int, stop_tokens: StopTokens,
                 temperature: float = 1.0, generator: torch.Generator | None = None):
        super().__init__(model, slots, max_len, stop_tokens, temperature, generator)
        cfg = model.hf.config
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        shape = (slots, max_len, kv_heads, head_dim)
        layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
        gdn = [t == "linear_attention" for t in layer_types]
        self._keys = [torch.zeros((0,) if g else shape, dtype=self.dtype, device=self.device) for g in gdn]
        self._values = [torch.zeros((0,) if g else shape, dtype=self.dtype, device=self.device) for g in gdn]
        self._conv: list[torch.Tensor | None] = [None] * len(gdn)
        self._state: list[torch.Tensor | None] = [None] * len(gdn)
        if any(gdn):  # Gated DeltaNet: the convolution's last inputs and the recurrent state per slot
            hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
            dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
            channels = 2 * hk * dk + hv * dv
            for i in (i for i, g in enumerate(gdn) if g):
                self._conv[i] = torch.zeros(slots, cfg.linear_conv_kernel_dim - 1, channels, dtype=self.dtype,
                                            device=self.device)
                self._state[i] = torch.zeros(slots, hv, dk, dv, dtype=acc_dtype(self.dtype), device=self.device)

    def _reset(self, slot: int) -> None:
        """A Gated DeltaNet layer's state and convolution inputs start from zero (a one-token
        prompt is not prefilled: its first step reads them)."""
        for cache in self._conv + self._state:
            if cache is not None:
                cache[slot] = 0

    @torch.no_grad()
    def prefill(self, slots: list[int]) -> None:
        """Feed the prompts of `slots` (freshly added) but their last token, packed in one
        forward of the model, writing their keys and values (and Gated DeltaNet layers' states)
        into the slots' caches."""
        prompts = [self.slots[i].request.prompt[:-1] for i in slots]
        lengths = [len(p) for p in prompts]
        ctx = CacheContext.prefill(self._keys, self._values, slots, lengths, self.device, self._conv, self._state)
        tokens = torch.tensor([t for p in prompts for t in p], device=self.device)
        self.model(tokens, ctx, logits_to_keep=1)  # the caches are what it is run for
        for i, n in zip(slots, lengths):
            self.slots[i].fed = n

    @torch.no_grad()
    def forward_step(self, tokens: torch.Tensor, pos: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Logits [B, vocab] of one token per slot `idx` at positions `pos`."""
        return self.model(tokens, CacheContext.decode(self._keys, self._values, idx, pos, self._conv, self._state))


def make_decoder(model: nn.Module, slots: int, max_len: int, stop_tokens: StopTokens, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> SlotDecoder:
    """The decoder for the model's kind: pliant's own `LM`, or a transformers model (`HFCausalLM`)."""
    if isinstance(model, LM):
        return Decoder(model, slots, max_len, stop_tokens, temperature, generator)
    if isinstance(model, HFCausalLM):
        return HFDecoder(model, slots, max_len, stop_tokens, temperature, generator)
    raise TypeError(f"no decoder for a {type(model).__module__}.{type(model).__qualname__}: generation runs "
                    f"pliant's LM (build_model) or an HFCausalLM (load_hf_model)")


def generate(model: LM | HFCausalLM, requests: list[Request], slots: int, stop_tokens: StopTokens,
             temperature: float = 1.0, generator: torch.Generator | None = None) -> list[Completion]:
    """Complete every request with continuous batching over `slots` slots; completions come
    back in the order they finished."""
    stop = stop_set(stop_tokens)
    if not requests:
        return []
    max_len = max(len(r.prompt) + r.max_new_tokens for r in requests)
    dec = make_decoder(model, min(slots, len(requests)), max_len, stop, temperature, generator)
    pending, out = list(requests), []
    while pending or dec.active():
        while pending and dec.free_slots():
            dec.add(pending.pop(0))
        out += dec.step()
    return out
