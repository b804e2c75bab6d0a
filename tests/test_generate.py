"""Generation with the decode cache gives the full forward's logits (float64): teacher-forced
step by step over slots of different lengths, and in sampling, where every recorded
log-probability equals the full forward's log-softmax at that token (the trainer's own
recomputation of the behaviour policy)."""
from __future__ import annotations

import pytest
import torch

from pliant.comm import SOLO
from pliant.runtime.generate import Decoder, Request, generate
from pliant.runtime.model import LM, SeqContext

from dist_jobs import tiny_spec

SPECS = {"hybrid": {}, "gqa-3-1": {"heads": 3, "kv_heads": 1}, "all-linear": {"attention": ("linear",)},
         "all-softmax": {"attention": ("softmax",)}}


def model_for(kw) -> LM:
    torch.manual_seed(0)
    m = LM(tiny_spec(**kw)).double()
    for p in m.parameters():  # larger weights than the init: logits that differ from uniform
        p.data.mul_(4.0)
    return m.eval()


def full_logits(model: LM, seq: list[int]) -> torch.Tensor:
    t = torch.tensor(seq)
    with torch.no_grad():
        return model(t, SeqContext.build(SOLO, [len(t)]))


@pytest.mark.parametrize("kw", list(SPECS.values()), ids=list(SPECS))
def test_teacher_forced_decode_matches_full_forward(kw):
    model = model_for(kw)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 50, (n,), generator=g).tolist() for n in (7, 1, 12, 4)]
    dec = Decoder(model, slots=len(seqs), max_len=12, stop_tokens=0)
    got = [[] for _ in seqs]
    for t in range(12):
        live = [i for i, s in enumerate(seqs) if t < len(s)]
        logits = dec.forward_step(torch.tensor([seqs[i][t] for i in live]), torch.tensor([t] * len(live)),
                                  torch.tensor(live))
        for row, i in enumerate(live):
            got[i].append(logits[row])
    for s, rows in zip(seqs, got):
        torch.testing.assert_close(torch.stack(rows), full_logits(model, s), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kw", list(SPECS.values()), ids=list(SPECS))
def test_sampled_logprobs_are_the_full_forward_logprobs(kw):
    model = model_for(kw)
    g = torch.Generator().manual_seed(2)
    reqs = [Request(torch.randint(1, 50, (n,), generator=g).tolist(), m, tag=i)
            for i, (n, m) in enumerate([(3, 9), (8, 2), (1, 6), (5, 5), (2, 0), (6, 7)])]
    out = generate(model, reqs, slots=3, stop_tokens=0, temperature=0.7, generator=torch.Generator().manual_seed(3))
    assert sorted(c.tag for c in out) == list(range(len(reqs)))
    for c in out:
        req = reqs[c.tag]
        assert c.prompt == req.prompt and len(c.response) == len(c.logprobs) <= req.max_new_tokens
        assert c.stopped == (bool(c.response) and c.response[-1] == 0)
        assert 0 not in c.response[:-1]  # nothing after the stop token
        if not c.response:
            continue
        logits = full_logits(model, c.prompt + c.response)[len(c.prompt) - 1:-1] / 0.7
        expect = torch.log_softmax(logits, -1).gather(1, torch.tensor(c.response)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), expect, rtol=1e-10, atol=1e-10)


def test_a_seeded_request_samples_the_same_tokens_whatever_shares_its_batch():
    """Request.seed (the rollout's per-response stream): the same tokens alone, in a batch of
    unseeded requests or of other seeded ones, added first or last; without a seed the
    batch's shared generator decides (a different draw here)."""
    model = model_for({})
    prompt = [5, 9, 2]

    def tokens(others: list[Request], first: bool, seed: int | None = 7) -> list[int]:
        mine = Request(prompt, 12, tag="mine", seed=seed)
        reqs = [mine, *others] if first else [*others, mine]
        out = generate(model, reqs, slots=4, stop_tokens=(), generator=torch.Generator().manual_seed(11))
        return next(c.response for c in out if c.tag == "mine")

    alone = tokens([], True)
    assert len(alone) == 12
    for others in ([Request([3, 3], 12, tag=1), Request([8], 12, tag=2)],
                   [Request([4, 1, 1, 6], 12, tag=1, seed=1), Request([2], 5, tag=2, seed=2)]):
        for first in (True, False):
            assert tokens(others, first) == alone
    crowd = [Request([3, 3], 12, tag=1), Request([8], 12, tag=2)]
    assert tokens(crowd, False, None) != tokens(crowd, True, None)  # the shared stream: order matters


def test_bad_requests_are_refused_with_the_limit():
    model = model_for({})
    dec = Decoder(model, slots=1, max_len=8, stop_tokens=0)
    with pytest.raises(ValueError, match="at least one token"):
        dec.add(Request([], 3))
    with pytest.raises(ValueError, match="exceeds the decoder's max_len 8"):
        dec.add(Request([1, 2, 3], 6))
    with pytest.raises(ValueError, match="temperature"):
        Decoder(model, 1, 8, 0, temperature=0.0)


@pytest.mark.parametrize("kw", list(SPECS.values()), ids=list(SPECS))
def test_prefill_fills_the_caches_as_token_by_token_feeding(kw):
    """Prompts prefilled together in one packed forward, into slots that held longer
    sequences before: the next token's logits equal the full forward's."""
    model = model_for(kw)
    g = torch.Generator().manual_seed(4)
    dec = Decoder(model, slots=3, max_len=16, stop_tokens=0)
    for n in (9, 12, 5):  # dirty every slot's cache first
        dec.add(Request(torch.randint(1, 50, (n,), generator=g).tolist(), 3))
    while dec.active():
        dec.step()
    prompts = [torch.randint(1, 50, (n,), generator=g).tolist() for n in (6, 2, 11)]
    for p in prompts:
        dec.add(Request(p, 3))
    dec.prefill([0, 1, 2])
    assert [s.fed for s in dec.slots] == [5, 1, 10]
    logits = dec.forward_step(torch.tensor([p[-1] for p in prompts]), torch.tensor([len(p) - 1 for p in prompts]),
                              torch.tensor([0, 1, 2]))
    for row, p in enumerate(prompts):
        torch.testing.assert_close(logits[row], full_logits(model, p)[-1], rtol=1e-10, atol=1e-10)
