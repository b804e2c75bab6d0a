"""The README's "Train your own model", end to end on CPU and without downloads: a JSONL
corpus, `pliant model init` (a tiny Llama-style directory and a BPE tokenizer trained on the
corpus), `pliant data prepare` (Megatron's indexed format), `pliant train` with the adaptive
planner on 4 ranks under the supervisor, `pliant export`; the exported model, loaded by
transformers, has a lower loss on held-out documents than the source model. `pliant model init`
of the hybrid families (Qwen3.5, Qwen3-Next) at its default shape gives directories
transformers loads and runs; hybrid shapes it cannot run are refused."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from pliant.launch.cli import main as cli
from pliant.runtime.scaffold import HYBRID_FAMILIES

from conftest import REPO

HELD_OUT = 40


def held_out_loss(model_dir, texts) -> float:
    """Mean next-token loss per target token of the documents, as training sees them
    (tokenizer's ids + EOS), with transformers' own model and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor(tok(text)["input_ids"][:512] + [tok.eos_token_id])[None]
            out = model(input_ids=ids, labels=ids)
            n = ids.shape[1] - 1
            total += out.loss.item() * n
            count += n
    return total / count


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_train_your_own_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's paths (my-model, data/corpus) are relative, as in the README
    assert cli(["data", "sample-corpus", "--out", "all.jsonl", "--mb", "2"]) == 0
    lines = open("all.jsonl").read().splitlines()
    open("corpus.jsonl", "w").write("\n".join(lines[:-HELD_OUT]) + "\n")
    held_out = [json.loads(x)["text"] for x in lines[-HELD_OUT:]]

    assert cli(["model", "init", "--family", "llama", "--corpus", "corpus.jsonl", "--out", "my-model",
                "--vocab-size", "2048", "--hidden", "96", "--layers", "2", "--heads", "4", "--kv-heads", "2",
                "--ffn-hidden", "256"]) == 0
    assert cli(["data", "prepare", "--input", "corpus.jsonl", "--tokenizer", "my-model", "--out", "data/corpus"]) == 0
    shutil.copy(REPO / "configs" / "hf-local-cpu.yaml", "job.yaml")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PLIANT_PG_TIMEOUT_S": "120"}
    r = subprocess.run([sys.executable, "-m", "pliant.launch.cli", "train", "--config", "job.yaml", "--steps", "30",
                        "--run-dir", "runs/mine"], capture_output=True, text=True, timeout=1200, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # (a step may appear twice: the fault monitor can restart a job from its last checkpoint)
    steps = [json.loads(x) for x in open("runs/mine/metrics.jsonl").read().splitlines()]
    assert steps[-1]["step"] == 30 and {s["step"] for s in steps} == set(range(1, 31))
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert (tmp_path / "runs/mine/tensorboard").is_dir()

    assert cli(["export", "--run-dir", "runs/mine", "--out", "my-model-trained"]) == 0
    before, after = held_out_loss("my-model", held_out), held_out_loss("my-model-trained", held_out)
    print(f"held-out loss per token: source {before:.3f} (ln vocab {math.log(2048):.3f}), "
          f"after 30 steps {after:.3f}; training loss {steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f}")
    assert after < before - 0.5


def test_model_init_hybrid_families(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}  # doc {i}"}) + "\n"
                              for i in range(300)))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for family in HYBRID_FAMILIES:
        out = tmp_path / family
        assert cli(["model", "init", "--family", family, "--corpus", str(corpus), "--out", str(out),
                    "--vocab-size", "512"]) == 0  # the default shape: hidden 128, 4 layers, 4 heads, 2 kv heads
        model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        assert model.config.layer_types == ["linear_attention"] * 3 + ["full_attention"]
        ids = torch.tensor([AutoTokenizer.from_pretrained(out)("def f(x): return x")["input_ids"]])
        assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
    for bad, said in ((["--layers", "2"], "--layers 4 or more"), (["--heads", "5", "--hidden", "160"], "even --heads")):
        assert cli(["model", "init", "--family", "qwen3_5", "--corpus", str(corpus), "--out",
                    str(tmp_path / "bad"), *bad]) == 2
        assert said in capsys.readouterr().err and not (tmp_path / "bad").exists()
