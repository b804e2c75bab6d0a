"""Training and exporting a Hugging Face model directory.

- Five steps of `pliant train` (4 CPU ranks, the adaptive planner mixing group sizes and
  micro-batches, DeepSpeed ZeRO-1) on a tiny Llama directory, and on a tiny Qwen3.5 one (three
  Gated DeltaNet layers and one gated softmax layer), equal a plain single-process
  transformers training loop on the same batches, to the float32 bound of DeepSpeed's
  optimizer path (as test_train_equivalence.py); then `pliant export` of the last checkpoint
  loads in transformers with exactly the trained parameters.
- Export right after loading gives a directory whose logits equal the source's (float64).
- A float32 model under ZeRO-1 exports the fp32 master weights gathered from the ranks'
  partitions, sharded with an index when asked; pliant's own hybrid model exports to a
  directory that pliant reads back with model.hf_path.
"""
from __future__ import annotations

import json

import pytest
import torch

from pliant.launch.cli import main as cli
from pliant.config import load_config
from pliant.runtime.export import export_run
from pliant.runtime.scaffold import HYBRID_FAMILIES, write_tiny_model
from pliant.runtime.tokenizer import train_bpe_tokenizer

from hf_jobs import hf_job_config
from hf_lift import lift_hybrids
from test_train_equivalence import RTOL, STEPS, reference_run, run_distributed

SHAPE = {"hidden": 32, "heads": 4, "kv_heads": 2, "ffn_hidden": 64, "layers": 2}
TEXTS = [f"document {i}: " + " ".join(["the quick brown fox jumps over the lazy dog"] * (i % 5 + 1)) for i in range(200)]


def load_hf(path, dtype=torch.float64):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa",
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model


# the families trained against transformers: shape beyond SHAPE (Qwen3.5's 4 layers are three Gated
# DeltaNet layers and one gated softmax layer) and device memory that leaves both the same ~0.5 MB
# for activations above their ZeRO-1 states (20 bytes/param in float64: Llama 38K, Qwen3.5 62K)
TRAINED = {"llama": ({}, 0.0012), "qwen3_5": ({"layers": 4}, 0.00165)}


def tiny_dir(root, family: str, **shape):
    """A float64 tiny directory of the family with a BPE tokenizer trained on TEXTS."""
    tok = train_bpe_tokenizer(TEXTS, 300, root / "tok")
    return write_tiny_model(family, root / "model", vocab_size=max(len(tok), 64), seed=2, dtype=torch.float64,
                            tokenizer_dir=root / "tok", **{**SHAPE, **shape})


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_dir(tmp_path_factory.mktemp("llama"), "llama")


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("family", list(TRAINED))
def test_five_steps_equal_transformers_loop_and_export(tmp_path, family):
    shape, memory_gib = TRAINED[family]
    model_dir = tiny_dir(tmp_path / "source", family, **shape)
    cfg_path = hf_job_config(tmp_path / "job.yaml", model_dir, memory_gib=memory_gib, tensorboard=True)
    cfg = load_config(cfg_path)
    if family in HYBRID_FAMILIES:  # pliant's ranks run the gated delta rule in float64, transformers
        # casts its inputs (and the decay g) to float32: Adam turns that rounding of the decay
        # parameters' small gradients (A_log, dt_bias, in_proj_a) into ~8e-5 after five steps
        lift_hybrids()
    want_losses, want_params = reference_run(cfg, STEPS, model=load_hf(model_dir),
                                             logits_of=lambda m, s: m(input_ids=s[None]).logits[0])
    steps, params = run_distributed(tmp_path, "adaptive", config=cfg_path)
    errors = [abs(s["loss"] - w) / abs(w) for s, w in zip(steps, want_losses)]
    rel = ((params.double() - want_params).norm() / want_params.norm()).item()
    print(f"{family}: loss relative errors {['%.1e' % e for e in errors]}, final parameters relative L2 {rel:.1e}, "
          f"groups by size per step {[s['group_mix'] for s in steps]}")
    assert max(errors) <= RTOL and rel <= RTOL
    assert any(len(s["group_mix"]) > 1 for s in steps) and any(s["micro_batches"] > 1 for s in steps)
    # train.tensorboard: event files beside metrics.jsonl, with the same losses
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "adaptive" / "tensorboard")).Reload()
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([s["loss"] for s in steps], rel=1e-6)
    assert len(events.Scalars("time/step_s")) == STEPS

    out = tmp_path / "exported"
    assert cli(["export", "--run-dir", str(tmp_path / "adaptive"), "--out", str(out)]) == 0
    model = load_hf(out)
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(got, params), "the exported parameters are the trained ones"
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (out / name).is_file(), name


@pytest.mark.timeout(300)
def test_export_right_after_loading_round_trips(pools, tmp_path, llama_dir):
    cfg_path = hf_job_config(tmp_path / "job.yaml", llama_dir, world=2, memory_gib=0.01)
    pools[2].run("dist_jobs:save_initial_checkpoint", str(cfg_path), str(tmp_path / "run"))
    r = export_run(tmp_path / "run", tmp_path / "out")
    assert r.step == 0 and r.weights_from == "model weights" and r.dtype == "fp64"
    src, dst = load_hf(llama_dir), load_hf(tmp_path / "out")
    ids = torch.randint(0, src.config.vocab_size, (1, 41), generator=torch.Generator().manual_seed(0))
    a, b = src(input_ids=ids).logits, dst(input_ids=ids).logits
    assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-12
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "out")("the fox")["input_ids"] == \
        AutoTokenizer.from_pretrained(llama_dir)("the fox")["input_ids"]


@pytest.mark.timeout(300)
def test_fp32_zero_partitions_are_gathered_and_sharded(pools, tmp_path):
    src = write_tiny_model("qwen2", tmp_path / "qwen2", vocab_size=64, seed=4, dtype=torch.float32, **SHAPE)
    cfg_path = hf_job_config(tmp_path / "job.yaml", src, world=2, memory_gib=0.01)
    initial = pools[2].run("dist_jobs:save_initial_checkpoint", str(cfg_path), str(tmp_path / "run"))[0]
    r = export_run(tmp_path / "run", tmp_path / "out", max_shard_size="40KB")
    assert r.weights_from == "ZeRO fp32 master partitions" and r.dtype == "fp32"
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1
    model = load_hf(tmp_path / "out", torch.float32)
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), initial)


@pytest.mark.timeout(300)
def test_pliant_model_exports_and_reads_back(pools, tmp_path):
    from pliant.planner.spec import ModelSpec
    from pliant.runtime.context import SeqContext
    from pliant.comm import SOLO
    from pliant.runtime.hf import build_model

    own = {"name": "tiny-hybrid", "layers": 4, "hidden": 32, "heads": 4, "kv_heads": 2, "head_dim": 8,
           "ffn_hidden": 64, "vocab_size": 64, "attention": ["linear", "linear", "linear", "softmax"], "dtype": "fp64"}
    cfg_path = hf_job_config(tmp_path / "job.yaml", None, world=2, model=own, memory_gib=0.01)
    initial = pools[2].run("dist_jobs:save_initial_checkpoint", str(cfg_path), str(tmp_path / "run"))[0]
    r = export_run(tmp_path / "run", tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["PliantLM"]
    spec = ModelSpec(hf_path=str(tmp_path / "out"), zero_stage=1)
    assert spec.attention == own["attention"] and spec.dtype == "fp64" and spec.params == r.params
    model = build_model(spec)
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), initial)
    tokens = torch.randint(0, 64, (30,))
    assert model(tokens, SeqContext.build(SOLO, [30])).shape == (30, 64)
    # a job config that trains it names it by directory alone
    cfg2 = load_config(hf_job_config(tmp_path / "again.yaml", tmp_path / "out", world=2))
    assert cfg2.model.layers == 4 and cfg2.model.attention == own["attention"]


def test_export_errors(tmp_path, capsys):
    assert cli(["export", "--run-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "run directory" in (err := capsys.readouterr().err) and "does not exist" in err
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000004.tmp").mkdir(parents=True)
    (run / "checkpoints" / "step-00000002").mkdir()  # no COMPLETE marker: a write that died
    assert cli(["export", "--run-dir", str(run), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "has no complete checkpoint" in err and "step-00000002" in err and "step-00000004.tmp" in err
    assert not (tmp_path / "o").exists()
