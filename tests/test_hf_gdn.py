"""Hybrid Hugging Face models (Qwen3.5 and Qwen3-Next: three Gated DeltaNet layers per gated
softmax layer) under pliant's SP, with transformers as the oracle.

Tiny random Qwen3.5 and Qwen3-Next directories (more linear value heads than key heads, GQA
in the softmax layers, partial rotary, the attention output gate; Qwen3-Next's fused
projections and sparse MoE MLPs with a shared expert, one dense layer among them) on 4 real gloo ranks under plans with SP
groups of 1, 2 and 4, on a pack whose documents are shorter than a group or not divisible
by it: logits and every parameter's gradient equal transformers' `AutoModelForCausalLM` run
on each document alone, within 1e-9 relative, float64, with transformers' float32 casts
lifted on both sides (tests/hf_lift.py). pliant runs the Gated DeltaNet core as LASP-2's
gather of chunk maps and the convolution with its halo (comm/gated_delta.py).
"""
from __future__ import annotations

import pytest
import torch

from pliant.planner.spec import ModelSpec
from pliant.runtime.scaffold import write_tiny_model

from hf_oracle import check_against_transformers, transformers_reference
from hf_lift import lift_hybrids

LENGTHS = [37, 5, 64, 18, 3, 23]
VOCAB = 97
PLANS = {
    "one group of 4": [(0, 4, [0, 1, 2, 3, 4, 5])],
    "mixed 2+1+1": [(0, 2, [2, 1, 4]), (2, 1, [0]), (3, 1, [3, 5])],
    "two groups of 2": [(0, 2, [0, 1, 5]), (2, 2, [2, 3, 4])],
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrids")
    return {family: write_tiny_model(family, root / family, VOCAB, seed=1, dtype=torch.float64, layers=4)
            for family in ("qwen3_5", "qwen3_next")}


@pytest.fixture(scope="module")
def model_dir(model_dirs):
    return model_dirs["qwen3_5"]


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_next"])
@pytest.mark.parametrize("plan", list(PLANS))
def test_hybrid_under_sp_matches_transformers(pools, model_dirs, family, plan):
    lift_hybrids()
    reference = transformers_reference(model_dirs[family], LENGTHS, VOCAB, seed=3)
    gdn = [n for n in reference[2] if "linear_attn" in n]
    assert any("A_log" in n for n in gdn) and any("conv1d" in n for n in gdn)  # the GDN parameters are checked
    if family == "qwen3_next":  # the routed experts, the router and the shared expert are checked too
        assert {"experts.gate_up_proj", "mlp.gate.weight", "shared_expert_gate"} <= {
            part for n in reference[2] for part in ("experts.gate_up_proj", "mlp.gate.weight", "shared_expert_gate")
            if part in n}
    results = pools[4].run("hf_lift:lifted_hf_model_grads", str(model_dirs[family]), LENGTHS, PLANS[plan], 3)
    worst = check_against_transformers(results, PLANS[plan], LENGTHS, reference)
    print(f"{family} {plan}: loss {float(reference[0]):.6f}, worst gradient relative error {worst:.1e}")


@pytest.mark.parametrize("linear", ["heads", "ring"])
def test_qwen3_next_in_the_other_forms_matches_transformers(pools, model_dirs, linear):
    """The head all-to-all (4 value heads over groups of 2) and the ring, as the planner may choose them."""
    lift_hybrids()
    plan = PLANS["two groups of 2"]
    reference = transformers_reference(model_dirs["qwen3_next"], LENGTHS, VOCAB, seed=3)
    results = pools[4].run("hf_lift:lifted_hf_model_grads", str(model_dirs["qwen3_next"]), LENGTHS, plan, 3, linear)
    worst = check_against_transformers(results, plan, LENGTHS, reference)
    print(f"qwen3_next {linear}: worst gradient relative error {worst:.1e}")


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


def test_gated_delta_shape_comes_from_config_json(model_dirs):
    from pliant.planner.cost import CostModel

    from conftest import SMALL_COST, small_cluster

    spec = ModelSpec(hf_path=str(model_dirs["qwen3_next"]), zero_stage=1)
    assert (spec.linear_kind, spec.linear_heads, spec.linear_key_heads, spec.linear_key_dim, spec.linear_value_dim,
            spec.linear_conv, spec.experts) == ("gated_delta", 4, 2, 16, 16, 4, 4)
    cost = CostModel.from_specs(small_cluster(), spec, SMALL_COST)
    assert cost.linear_state_bytes == 4 * 16 * (16 + 16) * 4 and cost.n_linear == 3
    with pytest.raises(ValueError, match="expert_parallel = 2: expert parallelism is not supported; .*its 4 routed"):
        ModelSpec(hf_path=str(model_dirs["qwen3_next"]), zero_stage=1, expert_parallel=2)


@pytest.mark.parametrize("arch, model_type", [("Qwen3_5MoeForCausalLM", "qwen3_5_moe"), ("JambaForCausalLM", "jamba")])
def test_a_hybrid_family_pliant_does_not_run_is_named(model_dir, tmp_path, arch, model_type):
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": [arch], "model_type": model_type}))
    with pytest.raises(ValueError, match=rf"architecture '{arch}' .* is a hybrid family pliant does not run.*"
                                         r"Qwen3_5ForCausalLM \(qwen3_5_text\), Qwen3NextForCausalLM"):
        ModelSpec(hf_path=str(bad), zero_stage=1)


def test_mode_changes_keep_pliant_gated_deltanet(model_dirs):
    """train() / eval() (DeepSpeed's engine, the RL learner's evaluation) must not put
    transformers' own whole-row Gated DeltaNet forward back: with hub kernels on, transformers
    re-kernelizes on a mode change and drops an instance's forward. Both the wrapped model's and
    the transformers model's own mode changes are checked."""
    from pliant.runtime.gdn import gdn_forward
    from pliant.runtime.hf import load_hf_model

    for family, path in model_dirs.items():
        model = load_hf_model(path, torch.float64)
        assert not model.hf.use_kernels
        model.train()
        model.eval()
        model.hf.train()
        model.hf.eval()
        layers = [m for m in model.modules() if type(m).__name__.endswith("GatedDeltaNet")]
        assert len(layers) == 3 and all(m.forward.__func__ is gdn_forward for m in layers), family
