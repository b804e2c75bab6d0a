"""A hybrid Hugging Face model (Qwen3.5: three Gated DeltaNet layers per gated softmax layer)
under pliant's SP, with transformers as the oracle.

A tiny random Qwen3.5 directory (more linear value heads than key heads, GQA in the softmax
layers, partial rotary, the attention output gate) on 4 real gloo ranks under plans with SP
groups of 1, 2 and 4, on a pack whose documents are shorter than a group or not divisible
by it: logits and every parameter's gradient equal transformers' `AutoModelForCausalLM` run
on each document alone, within 1e-9 relative, float64, with transformers' float32 casts
lifted on both sides (tests/hf_lift.py). pliant runs the Gated DeltaNet core as LASP-2's
gather of chunk maps and the convolution with its halo (comm/gated_delta.py).
"""
from __future__ import annotations

import pytest
import torch

from pliant.comm import PackLayout
from pliant.planner.spec import ModelSpec
from pliant.runtime.model import lm_loss_sum
from pliant.runtime.packing import next_token_targets, real_targets
from pliant.runtime.scaffold import write_tiny_model

from dist_jobs import batch_tokens
from hf_lift import lift_qwen3_5

LENGTHS = [37, 5, 64, 18, 3, 23]
VOCAB = 97
PLANS = {
    "one group of 4": [(0, 4, [0, 1, 2, 3, 4, 5])],
    "mixed 2+1+1": [(0, 2, [2, 1, 4]), (2, 1, [0]), (3, 1, [3, 5])],
    "two groups of 2": [(0, 2, [0, 1, 5]), (2, 2, [2, 3, 4])],
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model("qwen3_5", tmp_path_factory.mktemp("q35") / "qwen3_5", VOCAB, seed=1,
                            dtype=torch.float64, layers=4)


def reference(model_dir, lengths, seed):
    from transformers import AutoModelForCausalLM

    lift_qwen3_5()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64, attn_implementation="sdpa")
    seqs = batch_tokens(lengths, VOCAB, seed)
    logits = [model(input_ids=s[None]).logits[0] for s in seqs]
    loss = sum(lm_loss_sum(lg, next_token_targets(s)) for lg, s in zip(logits, seqs)) / real_targets(lengths)
    loss.backward()
    return loss.detach(), [lg.detach() for lg in logits], {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("plan", list(PLANS))
def test_qwen3_5_under_sp_matches_transformers(pools, model_dir, plan):
    want_loss, want_logits, want_grads = reference(model_dir, LENGTHS, seed=3)
    results = pools[4].run("hf_lift:lifted_hf_model_grads", str(model_dir), LENGTHS, PLANS[plan], 3)
    loss = sum(r[0] for r in results)
    assert abs(loss - want_loss) <= 1e-9 * abs(want_loss)
    for start, size, ids in PLANS[plan]:
        layout = PackLayout.from_lengths([LENGTHS[i] for i in ids], size)
        docs = layout.unshard([results[r][2] for r in range(start, start + size)])
        for i, got in zip(ids, docs):
            rel = (got - want_logits[i]).abs().max() / want_logits[i].abs().max()
            assert rel <= 1e-9, f"document {i} (group {start}+{size}): logits relative error {rel:.2e}"
    worst = 0.0
    gdn = [n for n in want_grads if "linear_attn" in n]
    assert any("A_log" in n for n in gdn) and any("conv1d" in n for n in gdn)  # the GDN parameters are checked
    for name, want in want_grads.items():
        got = sum(r[1][name] for r in results)
        rel = ((got - want).abs().max() / want.abs().max()).item()
        worst = max(worst, rel)
        assert rel <= 1e-9, f"{name}: gradient relative error {rel:.2e}"
    print(f"qwen3_5 {plan}: loss {float(loss):.6f}, worst gradient relative error {worst:.1e}")


def test_layer_mix_comes_from_layer_types(model_dir, tmp_path):
    import json
    import shutil

    assert ModelSpec(hf_path=str(model_dir), zero_stage=1).attention == ["linear", "linear", "linear", "softmax"]
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["layer_types"] = cfg["layer_types"][:3]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"layer_types = .*expected a list of num_hidden_layers = 4 entries"):
        ModelSpec(hf_path=str(bad), zero_stage=1)
