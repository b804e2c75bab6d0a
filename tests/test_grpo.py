"""The RL loss pieces against direct formulas (float64): group advantages, packed response
log-probs, importance weights (exactly 1 for samples of the trainer's own version, the
truncated ratio for stale ones), and the loss gradient of the on-policy case."""
from __future__ import annotations

import pytest
import torch

from pliant.rl.grpo import SOLO, group_advantages, policy_loss, response_logprobs
from pliant.runtime.model import LM, SeqContext

from dist_jobs import tiny_spec


def model() -> LM:
    torch.manual_seed(0)
    return LM(tiny_spec()).double()


def test_group_advantages_are_normalised_within_each_group():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    adv = group_advantages(r, 4)
    torch.testing.assert_close(adv[:4], torch.tensor([3.0, -1.0, -1.0, -1.0], dtype=torch.float64) / 3 ** 0.5,
                               rtol=1e-5, atol=1e-6)
    assert torch.all(adv[4:] == 0)  # a group that all agree teaches nothing


def test_packed_response_logprobs_equal_one_sequence_at_a_time():
    m = model()
    prompts, responses = [[1, 2, 3], [4], [5, 6]], [[7, 8], [9, 10, 11, 12], [13]]
    got = response_logprobs(m, prompts, responses)
    for p, r, g in zip(prompts, responses, got):
        seq = torch.tensor(p + r)
        logp = torch.log_softmax(m(seq, SeqContext.build(SOLO, [len(seq)])), -1)
        expect = logp[len(p) - 1:-1].gather(1, torch.tensor(r)[:, None]).squeeze(1)
        torch.testing.assert_close(g, expect, rtol=1e-12, atol=1e-12)


def inputs(m: LM):
    prompts, responses = [[1, 2], [3, 4, 5], [6], [7, 8]], [[9, 10, 11], [12], [13, 14], [15, 16, 17, 18]]
    logp = response_logprobs(m, prompts, responses)
    behav = [lp.detach() + 0.05 * torch.arange(len(lp), dtype=lp.dtype) for lp in logp]  # an older policy
    ref = [lp.detach() - 0.1 for lp in logp]
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)
    return logp, behav, ref, adv


def test_on_policy_weights_are_exactly_one_and_the_gradient_is_the_policy_gradient():
    m = model()
    logp, behav, ref, adv = inputs(m)
    loss, stats = policy_loss(logp, behav, ref, adv, versions=[3] * 4, version=3, batch_samples=8,
                              clip_eps=0.2, kl_coef=0.0, is_cap=2.0)
    assert stats.is_weights == [1.0] * 4 and stats.clipped == 0.0
    grads = torch.autograd.grad(loss, list(m.parameters()))
    m2 = model()
    logp2, *_ = inputs(m2)
    expect = -sum(a * lp.mean() for a, lp in zip(adv, logp2)) / 8
    for g, e in zip(grads, torch.autograd.grad(expect, list(m2.parameters()))):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_stale_samples_get_the_truncated_importance_weight():
    m = model()
    logp, behav, ref, adv = inputs(m)
    _, stats = policy_loss(logp, behav, ref, adv, versions=[3, 2, 1, 3], version=3, batch_samples=4,
                           clip_eps=0.2, kl_coef=0.1, is_cap=1.02)
    for i in (1, 2):
        w = torch.exp(logp[i].detach() - behav[i]).clamp(max=1.02).mean()
        assert stats.is_weights[i] == pytest.approx(float(w), rel=1e-12)
    assert stats.is_weights[0] == stats.is_weights[3] == 1.0
    assert stats.is_weights[2] < 1.0  # behav above prox: the stale policy liked these tokens more
    assert stats.kl > 0


def test_a_sample_from_a_newer_version_is_refused():
    m = model()
    logp, behav, ref, adv = inputs(m)
    with pytest.raises(ValueError, match="policy version 4 reached the learner at version 3"):
        policy_loss(logp, behav, ref, adv, [3, 4, 3, 3], 3, 4, 0.2, 0.0, 2.0)
