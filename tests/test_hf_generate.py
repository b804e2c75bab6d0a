"""Generation with a Hugging Face policy (`HFDecoder`), with transformers as the oracle.

Tiny random models of each family (written by `save_pretrained`, float64), decoded through
pliant's attention hook with the decode cache, against a separate instance of the same
directory run by transformers with its own SDPA attention over the whole prompt + response:
every sampled token's log-probability, and teacher-forced logits after a packed prefill into
dirty slots, agree within 1e-9. Prompts of different lengths share the decoder, with more
prompts than slots (slots refilled mid-run), so a wrong cache position, a wrong RoPE position
or attention across prompts shows as a difference far above the tolerance.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from pliant.runtime.generate import Completion, Decoder, HFDecoder, Request, generate, make_decoder, stop_set
from pliant.runtime.hf import load_hf_model
from pliant.runtime.model import LM
from pliant.runtime.scaffold import HYBRID_FAMILIES, write_tiny_model

from dist_jobs import tiny_spec
from hf_lift import lift_hybrids

VOCAB = 61
# GQA and llama3 RoPE; q/k/v biases; q/k norms with head_dim != hidden/heads; Gated DeltaNet layers
# (the convolution's inputs and the recurrent state cached per slot), Qwen3-Next's with MoE MLPs
FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_5", "qwen3_next")
TEMP = 0.8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny float64 matmuls: intra-op threads only contend (tens of times slower on a busy
    machine); one thread for this module, restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Per family: pliant's HFCausalLM ("pliant" attention) and transformers' own (SDPA) on the
    same directory. Larger init than transformers' 0.02, so the logits are far from uniform."""
    from transformers import AutoModelForCausalLM

    lift_hybrids()  # transformers' float32 casts in the hybrids' layers, lifted on both sides
    root = tmp_path_factory.mktemp("hfgen")
    out = {}
    for fam in FAMILIES:
        d = write_tiny_model(fam, root / fam, VOCAB, seed=5, dtype=torch.float64, hidden=32, heads=4, kv_heads=2,
                             ffn_hidden=48, initializer_range=0.3, layers=4 if fam in HYBRID_FAMILIES else 2)
        ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64, attn_implementation="sdpa",
                                                   experts_implementation="eager").eval()
        out[fam] = (load_hf_model(d, torch.float64).train().eval(), ref)  # a mode change keeps pliant's layers
    return out


def ref_logits(ref: nn.Module, seq: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(input_ids=torch.tensor([seq])).logits[0]


def ref_logprobs(ref: nn.Module, prompt: list[int], response: list[int], temperature: float) -> torch.Tensor:
    """transformers' log-probability of each response token at the sampling temperature."""
    logits = ref_logits(ref, prompt + response)[len(prompt) - 1:-1] / temperature
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(response)[:, None]).squeeze(1)


def prompts(lengths, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def run(dec, requests: list[Request]) -> tuple[list, int]:
    """Drive a decoder as rollout does; also count refills while other slots were mid-sequence."""
    pending, out, refills = list(requests), [], 0
    while pending or dec.active():
        while pending and dec.free_slots():
            refills += any(s is not None and s.fed > 0 for s in dec.slots)
            dec.add(pending.pop(0))
        out += dec.step()
    return out, refills


@pytest.mark.parametrize("family", FAMILIES)
def test_sampled_logprobs_are_transformers_logprobs(models, family):
    model, ref = models[family]
    reqs = [Request(p, m, tag=i) for i, (p, m) in
            enumerate(zip(prompts([5, 12, 3, 8, 1, 2, 9], seed=1), [9, 3, 4, 0, 11, 7, 5]))]  # the 1-token prompt into a used slot
    dec = HFDecoder(model, slots=3, max_len=16, stop_tokens=(0, 1), temperature=TEMP,
                    generator=torch.Generator().manual_seed(2))
    out, refills = run(dec, reqs)
    assert refills >= 2  # slots were refilled (and prefilled) while others were decoding
    assert sorted(c.tag for c in out) == list(range(len(reqs)))
    assert sum(len(c.response) for c in out) >= 25
    for c in out:
        req = reqs[c.tag]
        assert c.prompt == req.prompt and len(c.response) == len(c.logprobs) <= req.max_new_tokens
        if not c.response:
            continue
        want = ref_logprobs(ref, c.prompt, c.response, TEMP)
        got = torch.tensor(c.logprobs, dtype=torch.float64)
        assert (got - want).abs().max() <= 1e-9, f"request {c.tag}: {got.tolist()} vs {want.tolist()}"


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_prefill_into_dirty_slots_then_decode_matches_transformers(models, family):
    """Teacher-forced: prompts prefilled together into slots that held longer sequences, then
    fed token by token at their own positions; each step's logits are transformers' for the
    sequence, and a sequence's logits are the same decoded alone in slot 0."""
    model, ref = models[family]
    dec = HFDecoder(model, slots=3, max_len=20, stop_tokens=0)
    for p in prompts([14, 17, 9], seed=3):  # dirty every slot's cache
        dec.add(Request(p, 3))
    while dec.active():
        dec.step()
    seqs = prompts([11, 6, 15], seed=4)
    cut = [7, 2, 4]  # prompt part of each sequence: the rest is fed one token per step
    for s, n in zip(seqs, cut):
        dec.add(Request(s[:n], 20 - n))
    dec.prefill([0, 1, 2])
    assert [s.fed for s in dec.slots] == [n - 1 for n in cut]
    got = [[] for _ in seqs]
    for t in range(min(cut) - 1, max(len(s) for s in seqs)):
        live = [i for i, s in enumerate(seqs) if cut[i] - 1 <= t < len(s)]
        logits = dec.forward_step(torch.tensor([seqs[i][t] for i in live]), torch.tensor([t] * len(live)),
                                  torch.tensor(live))
        for row, i in enumerate(live):
            got[i].append(logits[row])
    for i, (s, n) in enumerate(zip(seqs, cut)):
        mine = torch.stack(got[i])
        want = ref_logits(ref, s)[n - 1:]
        assert (mine - want).abs().max() <= 1e-9 * want.abs().max(), f"sequence {i}"
    alone = HFDecoder(model, slots=1, max_len=20, stop_tokens=0)
    s, n = seqs[2], cut[2]
    alone.add(Request(s[:n], 20 - n))
    alone.prefill([0])
    solo = torch.cat([alone.forward_step(torch.tensor([s[t]]), torch.tensor([t]), torch.tensor([0]))
                      for t in range(n - 1, len(s))])
    assert (solo - torch.stack(got[2])).abs().max() <= 1e-12


def test_response_ends_at_any_stop_id_or_max_new_tokens(models):
    """Near-greedy decoding (the same tokens whoever shares the step): the responses without
    stop ids give where each stop id first occurs; with two stop ids, each response ends at
    the first of either, stop id included, or at max_new_tokens."""
    model, _ = models["llama"]
    reqs = [Request(p, 10, tag=i) for i, p in enumerate(prompts([4, 7, 2, 9, 5, 3], seed=6))]

    def decode(stop) -> dict[int, Completion]:
        out = generate(model, reqs, 2, stop, temperature=1e-6, generator=torch.Generator().manual_seed(0))
        return {c.tag: c for c in out}

    free = decode(())
    assert all(not c.stopped and len(c.response) == 10 for c in free.values())
    a, b = free[0].response[3], free[1].response[5]
    stops = {a, b}
    ends, counts = [], {a: 0, b: 0}
    for tag, c in free.items():
        first = next((j for j, t in enumerate(c.response) if t in stops), None)
        ends.append(c.response if first is None else c.response[:first + 1])
        if first is not None:
            counts[c.response[first]] += 1
    assert counts[a] and counts[b] and any(len(e) == 10 and e[-1] not in stops for e in ends)
    got = decode([a, b])
    for tag, want in enumerate(ends):
        c = got[tag]
        assert c.response == want
        assert c.stopped == (want[-1] in stops)
        assert len(c.logprobs) == len(c.response)
        assert not stops & set(c.response[:-1])


def test_generate_is_reproducible_with_a_seeded_generator(models):
    model, _ = models["qwen3"]
    reqs = [Request(p, 6, tag=i) for i, p in enumerate(prompts([3, 8, 1, 5], seed=7))]

    def sample(seed: int):
        out = generate(model, reqs, 2, [0, 1], TEMP, torch.Generator().manual_seed(seed))
        return sorted((c.tag, c.response, c.logprobs, c.stopped) for c in out)

    first = sample(11)
    assert sample(11) == first
    assert sample(12) != first  # the generator is what the draws come from


def test_make_decoder_picks_the_model_kind(models):
    model, _ = models["qwen2"]
    assert type(make_decoder(model, 2, 8, 0)) is HFDecoder
    torch.manual_seed(0)
    lm = LM(tiny_spec()).double()
    assert type(make_decoder(lm, 2, 8, [0, 1])) is Decoder
    with pytest.raises(TypeError, match=r"no decoder for a torch\.nn\.modules\.linear\.Linear: generation runs "
                                        r"pliant's LM .* or an HFCausalLM"):
        make_decoder(nn.Linear(2, 2), 2, 8, 0)
    with pytest.raises(TypeError, match=r"no decoder for a .*Linear"):
        generate(nn.Linear(2, 2), [Request([1], 2)], 1, 0)


def test_stop_ids_are_one_id_or_several():
    assert stop_set(7) == {7} and stop_set([2, 7, 2]) == {2, 7}
    assert stop_set(torch.tensor([4, 5]).tolist()) == {4, 5}
    assert stop_set([]) == frozenset()


def test_sliding_window_is_checked_while_decoding(tmp_path):
    """A sequence that grows past the model's sliding window is refused (full attention only),
    in the decode step as in the packed forward."""
    d = write_tiny_model("mistral", tmp_path / "m", VOCAB, dtype=torch.float64, hidden=32, heads=4, kv_heads=2,
                         ffn_hidden=48, sliding_window=8)
    model = load_hf_model(d, torch.float64)
    dec = HFDecoder(model, slots=1, max_len=16, stop_tokens=())
    dec.add(Request(list(range(3, 9)), 6))
    for _ in range(3):  # positions 5, 6, 7: spans up to 8 tokens
        dec.step()
    with pytest.raises(ValueError, match="a sequence of 9 tokens is longer than the model's sliding window"):
        dec.step()
