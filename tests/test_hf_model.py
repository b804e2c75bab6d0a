"""Hugging Face models under pliant's SP, with transformers as the oracle.

For a tiny random-initialised model of each supported family (written by `save_pretrained`),
pliant's forward and backward on a pack of documents of different lengths, on 4 real gloo
ranks under plans with SP groups of 1, 2 and 4 (Ulysses, and LASP-2H where the heads do not
divide the group), equal `AutoModelForCausalLM` run on each document on its own with its SDPA
attention: logits and every parameter's gradient within 1e-9 relative, float64.
"""
from __future__ import annotations

import json

import pytest
import torch

from pliant.planner.model_dir import ModelDirError, read_model_dir
from pliant.planner.spec import ModelSpec
from pliant.runtime.hf import load_hf_model
from pliant.runtime.scaffold import FAMILIES, write_tiny_model

from hf_oracle import check_against_transformers, transformers_reference

LENGTHS = [37, 5, 64, 18, 3, 23]
VOCAB = 97
PLANS = {
    "one group of 4": [(0, 4, [0, 1, 2, 3, 4, 5])],
    "mixed 2+1+1": [(0, 2, [2, 1, 4]), (2, 1, [0]), (3, 1, [3, 5])],
    "two groups of 2": [(0, 2, [0, 1, 5]), (2, 2, [2, 3, 4])],
}
# heads 4: Ulysses at every size; heads 6 (kv 2): Ulysses in groups of 2, LASP-2H in the group of 4
SHAPES = {"heads4": {}, "heads6": {"hidden": 96, "heads": 6, "kv_heads": 2}}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {(fam, shape): write_tiny_model(fam, root / f"{fam}-{shape}", VOCAB, seed=1, dtype=torch.float64,
                                           **SHAPES[shape])
            for fam in FAMILIES for shape in SHAPES}


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_sp_matches_transformers(pools, model_dirs, family, shape, plan):
    model_dir = model_dirs[(family, shape)]
    reference = transformers_reference(model_dir, LENGTHS, VOCAB, seed=3)
    results = pools[4].run("dist_jobs:hf_model_grads", str(model_dir), LENGTHS, PLANS[plan], 3)
    worst = check_against_transformers(results, PLANS[plan], LENGTHS, reference)
    operators = {results[r][3] for start, size, _ in PLANS[plan] for r in range(start, start + size)}
    if shape == "heads6" and plan == "one group of 4":
        assert operators == {"lasp2h"}
    elif shape == "heads4" or plan != "one group of 4":
        assert "ulysses" in operators or all(size == 1 for _, size, _ in PLANS[plan])
    print(f"{family} {shape} {plan}: loss {float(reference[0]):.6f}, worst gradient relative error {worst:.1e}")


def test_spec_comes_from_config_json(model_dirs):
    d = model_dirs[("qwen3", "heads4")]
    spec = ModelSpec(hf_path=str(d), zero_stage=1)
    cfg = json.loads((d / "config.json").read_text())
    assert (spec.layers, spec.hidden, spec.heads, spec.kv_heads, spec.head_dim, spec.ffn_hidden, spec.vocab_size) == (
        cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
        cfg["head_dim"], cfg["intermediate_size"], cfg["vocab_size"])
    assert spec.head_dim != spec.hidden // spec.heads  # Qwen3's own head_dim, not derived
    model = load_hf_model(d, torch.float64)
    assert spec.params == sum(p.numel() for p in model.parameters())  # exact, tied embeddings once
    assert spec.dtype == "fp64" and spec.attention == ["softmax"]
    same = ModelSpec(hf_path=str(d), zero_stage=1, hidden=spec.hidden, heads=spec.heads)
    assert same == spec
    with pytest.raises(ValueError, match=r"hidden = 128 disagrees with the model directory: hidden_size = 64 in .*"
                                         r"config.json"):
        ModelSpec(hf_path=str(d), zero_stage=1, hidden=128)


def test_bad_model_directories(model_dirs, tmp_path):
    src = model_dirs[("llama", "heads4")]
    with pytest.raises(ModelDirError, match="has no config.json"):
        read_model_dir(tmp_path)
    nocfg = tmp_path / "weights-only"
    nocfg.mkdir()
    (nocfg / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(ModelDirError, match=r"has no weights \(no \*.safetensors"):
        read_model_dir(nocfg)
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ModelDirError, match=r"architecture 'GPT2LMHeadModel' .* is not supported; pliant runs "
                                            r"LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        read_model_dir(gpt2)
    # a tensor whose shape disagrees with the config
    bad = tmp_path / "bad-shape"
    bad.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    with pytest.raises(ModelDirError, match=r"model.safetensors: tensor model.layers.0.mlp.down_proj.weight has shape "
                                            r"\[64, 96\], but config.json gives \[64, 80\]"):
        load_hf_model(bad, torch.float64)


def test_a_failing_file_system_is_a_fault_not_a_bad_model_directory(model_dirs, monkeypatch):
    """An OSError with an errno while the weights load (EIO: a disk or mount failing on this
    node) is raised as itself, so that the fault monitor restarts the job elsewhere; the
    errors transformers raises about a directory's content stay ModelDirError (bad input)."""
    import errno

    from transformers import AutoModelForCausalLM

    src = model_dirs[("llama", "heads4")]

    def failing(exc):
        def from_pretrained(*args, **kwargs):
            raise exc
        return from_pretrained

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", failing(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(OSError) as raised:
        load_hf_model(src, torch.float64)
    assert not isinstance(raised.value, ModelDirError) and raised.value.errno == errno.EIO
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", failing(OSError("no file named model.safetensors")))
    with pytest.raises(ModelDirError, match="transformers could not load the model: no file named"):
        load_hf_model(src, torch.float64)


def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    from pliant.runtime.tokenizer import train_bpe_tokenizer

    texts = [f"line {i} of a small corpus with words and more words {i * 7}" for i in range(300)]
    tok = train_bpe_tokenizer(texts, 400, tmp_path / "tok")
    assert len(tok) > 64
    d = write_tiny_model("mistral", tmp_path / "m", vocab_size=64, dtype=torch.float64, tokenizer_dir=tmp_path / "tok")
    with pytest.raises(ModelDirError, match=rf"the tokenizer has {len(tok)} tokens, more than the model's embedding "
                                            r"\(vocab_size 64 in config.json\)"):
        load_hf_model(d, torch.float64)
