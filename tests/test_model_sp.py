"""The model under any plan gives the loss and gradients of single-device training on the
same batch (float64, 4 real gloo ranks, mixed SP group sizes)."""
from __future__ import annotations

import pytest
import torch

from pliant.comm import SPGroup
from pliant.runtime.model import LM, SeqContext, lm_loss_sum, rotary
from pliant.runtime.packing import next_token_targets, real_targets

from dist_jobs import batch_tokens, tiny_spec

LENGTHS = [37, 5, 64, 18, 9, 23]


def reference(spec_kwargs, lengths, seed):
    spec = tiny_spec(**spec_kwargs)
    torch.manual_seed(0)
    model = LM(spec).double()
    seqs = batch_tokens(lengths, spec.vocab_size, seed)
    solo = SPGroup(0, 1, 0, None)
    loss = sum(lm_loss_sum(model(s, SeqContext.build(solo, [len(s)])), next_token_targets(s)) for s in seqs)
    loss = loss / real_targets([len(s) for s in seqs])
    loss.backward()
    return loss.detach(), torch.cat([p.grad.reshape(-1) for p in model.parameters()])


PLANS = {
    "one group of 4": [(0, 4, [0, 1, 2, 3, 4, 5])],
    "data parallel": [(0, 1, [0, 3]), (1, 1, [1, 4]), (2, 1, [2]), (3, 1, [5])],
    "mixed 2+1+1": [(0, 2, [2, 1]), (2, 1, [0, 4]), (3, 1, [3, 5])],
    "two groups of 2": [(0, 2, [0, 1, 5]), (2, 2, [2, 3, 4])],
}


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("spec_kwargs", [{}, {"heads": 3, "kv_heads": 1}, {"attention": ("softmax",)}],
                         ids=["hybrid-ulysses", "hybrid-lasp2h", "all-softmax"])
def test_any_plan_matches_single_device(pools, plan, spec_kwargs):
    want_loss, want_grad = reference(spec_kwargs, LENGTHS, seed=3)
    results = pools[4].run("dist_jobs:model_grads", spec_kwargs, LENGTHS, PLANS[plan], 3)
    loss = sum(r[0] for r in results)
    grad = sum(r[1] for r in results)  # what the data-parallel gradient reduction sums
    assert abs(loss - want_loss) <= 1e-9 * abs(want_loss)
    rel = (grad - want_grad).abs().max() / want_grad.abs().max()
    assert rel <= 1e-9, f"max relative gradient error {rel:.3e}"


def test_rotary_is_relative():
    q, k = torch.randn(2, 5, 2, 8, dtype=torch.float64)
    pos = torch.arange(5)
    a = torch.einsum("thd,shd->hts", rotary(q, pos), rotary(k, pos))
    b = torch.einsum("thd,shd->hts", rotary(q, pos + 17), rotary(k, pos + 17))
    assert (a - b).abs().max() < 1e-12
