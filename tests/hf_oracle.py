"""transformers as the oracle of a Hugging Face model under pliant's SP (tests/test_hf_model.py,
tests/test_hf_gdn.py): its own forward on each document alone, and the check of what the
ranks of a plan computed (dist_jobs.hf_model_grads) against it, float64, 1e-9 relative."""
from __future__ import annotations

import torch

from pliant.comm import PackLayout
from pliant.runtime.model import lm_loss_sum
from pliant.runtime.packing import next_token_targets, real_targets

from dist_jobs import batch_tokens

TOL = 1e-9


def transformers_reference(model_dir, lengths, vocab: int, seed: int):
    """transformers on each document alone (SDPA attention; its eager path softmaxes in float32):
    (loss, [logits per document], {parameter name: gradient})."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64, attn_implementation="sdpa",
                                                 experts_implementation="eager")  # grouped_mm takes no float64
    seqs = batch_tokens(lengths, vocab, seed)
    logits = [model(input_ids=s[None]).logits[0] for s in seqs]
    loss = sum(lm_loss_sum(lg, next_token_targets(s)) for lg, s in zip(logits, seqs)) / real_targets(lengths)
    loss.backward()
    return loss.detach(), [lg.detach() for lg in logits], {n: p.grad for n, p in model.named_parameters()}


def check_against_transformers(results, plan, lengths, reference) -> float:
    """The ranks' (loss, grads, local logits, ...) of `plan` [(start, size, [doc ids])] against
    `reference`: the loss, every document's logits (reassembled from its group's ranks) and
    every parameter's gradient (summed over ranks, as the data-parallel reduction sums) within
    TOL relative. Returns the worst gradient error."""
    want_loss, want_logits, want_grads = reference
    loss = sum(r[0] for r in results)
    assert abs(loss - want_loss) <= TOL * abs(want_loss)
    for start, size, ids in plan:
        layout = PackLayout.from_lengths([lengths[i] for i in ids], size)
        docs = layout.unshard([results[r][2] for r in range(start, start + size)])
        for i, got in zip(ids, docs):
            rel = (got - want_logits[i]).abs().max() / want_logits[i].abs().max()
            assert rel <= TOL, f"document {i} (group {start}+{size}): logits relative error {rel:.2e}"
    worst = 0.0
    for name, want in want_grads.items():
        got = sum(r[1][name] for r in results)
        rel = ((got - want).abs().max() / want.abs().max()).item()
        worst = max(worst, rel)
        assert rel <= TOL, f"{name}: gradient relative error {rel:.2e}"
    return worst
