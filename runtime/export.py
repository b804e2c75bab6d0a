"""`pliant export`: a checkpoint of a run, as a Hugging Face model directory.

What is written (atomically: into a temporary directory beside OUT, renamed into place once
complete):
- for a Hugging Face model (`model.hf_path`): transformers' own `save_pretrained` of the
  family the source directory names: config.json, safetensors (sharded with
  model.safetensors.index.json above `max_shard_size`), generation_config.json (the source's,
  when it has one), and the source's tokenizer files. `AutoModelForCausalLM.from_pretrained`
  loads it with no missing or unexpected keys.
- for pliant's own hybrid model: config.json (architecture "PliantLM", the shape in the
  Hugging Face key names, the layer pattern), safetensors and generation_config.json, which
  pliant reads back with `model.hf_path`.

Where the weights come from: DeepSpeed's ZeRO optimizer keeps float32 master weights,
partitioned over the ranks; they are gathered from the partitions (DeepSpeed's
`zero_to_fp32`) when the model trains in float32 or lower precision. A float64 model's own
weights (saved whole by ZeRO stages 0-2) are more precise than the float32 masters, and are
exported instead.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pliant.planner.model_dir import DTYPE_NAMES, PLIANT_ARCHITECTURE, read_model_dir
from pliant.planner.spec import ModelSpec

from .checkpoint import COMPLETE, CheckpointError, complete_checkpoints
from .errors import ExportError
from .hf import DTYPES
from .tokenizer import copy_tokenizer_files

MODEL_STATES = "mp_rank_00_model_states.pt"


@dataclass
class ExportResult:
    out: Path
    step: int
    checkpoint: Path
    weights_from: str  # "model weights" or "ZeRO fp32 master partitions"
    dtype: str
    params: int
    files: list[str] = field(default_factory=list)


def find_checkpoint(run_dir: Path, step: int | None) -> Path:
    root = Path(run_dir) / "checkpoints"
    done = complete_checkpoints(root)
    if not Path(run_dir).is_dir():
        raise ExportError(f"run directory {run_dir} does not exist")
    if not done:
        partial = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        raise ExportError(f"{run_dir} has no complete checkpoint (a checkpoint counts once its {COMPLETE} marker is "
                          f"written){'; ' + root.name + '/ holds ' + ', '.join(partial) if partial else ''}")
    if step is None:
        return done[-1]
    for path in done:
        if int(path.name.split("-")[1]) == step:
            return path
    raise ExportError(f"{run_dir} has no complete checkpoint of step {step}; complete: "
                      f"{', '.join(str(int(p.name.split('-')[1])) for p in done)}")


def checkpoint_state_dict(path: Path, spec: ModelSpec) -> tuple[dict[str, torch.Tensor], str]:
    """The model's full state dict from one checkpoint directory, and where it came from."""
    if spec.zero_stage == 3 or (spec.zero_stage > 0 and spec.dtype != "fp64"):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            sd = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise ExportError(f"{path}: could not gather the ZeRO partitions: {e}") from None
        return dict(sd), "ZeRO fp32 master partitions"
    states = path / MODEL_STATES
    if not states.is_file():
        raise ExportError(f"{path}: no {MODEL_STATES} (not a DeepSpeed checkpoint?)")
    module = torch.load(states, map_location="cpu", weights_only=False)["module"]
    return dict(module), "model weights"


def _hf_model(spec: ModelSpec, state: dict[str, torch.Tensor], dtype: torch.dtype):
    """The source directory's transformers model class holding `state`."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    src = Path(spec.hf_path)  # type: ignore[arg-type]
    config = AutoConfig.from_pretrained(src)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {k.removeprefix("hf."): v.to(dtype) for k, v in state.items()}
    expected = set(model.state_dict())
    tied = {k for k in expected if k not in state and getattr(config, "tie_word_embeddings", False)
            and k.endswith("lm_head.weight")}
    missing, unexpected = sorted(expected - set(state) - tied), sorted(set(state) - expected)
    if missing or unexpected:
        raise ExportError(f"the checkpoint's weights do not match {src / 'config.json'}: missing {missing[:6]}, "
                          f"unexpected {unexpected[:6]}")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    if (src / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(src)
    return model


def pliant_config(spec: ModelSpec, dtype: str) -> dict:
    """config.json of pliant's own model, in the Hugging Face key names where they exist."""
    from .model import RMS_EPS, ROPE_THETA

    return {
        "architectures": [PLIANT_ARCHITECTURE], "model_type": "pliant",
        "num_hidden_layers": spec.layers, "hidden_size": spec.hidden, "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads, "head_dim": spec.head_dim, "intermediate_size": spec.ffn_hidden,
        "vocab_size": spec.vocab_size, "attention_pattern": list(spec.attention), "linear_decay": spec.linear_decay,
        "rope_theta": ROPE_THETA, "rms_norm_eps": RMS_EPS, "tie_word_embeddings": False,
        "dtype": {short: name for name, short in DTYPE_NAMES.items()}[dtype],
    }


def _write_pliant(spec: ModelSpec, state: dict[str, torch.Tensor], dtype: str, out: Path, max_shard_size) -> None:
    from huggingface_hub import save_torch_state_dict
    from transformers import GenerationConfig

    save_torch_state_dict({k: v.to(DTYPES[dtype]).clone() for k, v in state.items()}, out,  # own storage each
                          max_shard_size=max_shard_size)
    (out / "config.json").write_text(json.dumps(pliant_config(spec, dtype), indent=2) + "\n")
    GenerationConfig().to_json_file(out / "generation_config.json")


def export_run(run_dir: str | Path, out: str | Path, step: int | None = None, dtype: str | None = None,
               max_shard_size: int | str = "5GB", overwrite: bool = False) -> ExportResult:
    """Write the checkpoint of `step` (default: the newest complete one) of a run as a model
    directory at `out`, in `dtype` (default: the source directory's, else the training dtype)."""
    run_dir, out = Path(run_dir), Path(out)
    ckpt = find_checkpoint(run_dir, step)
    meta = json.loads((ckpt / "meta.json").read_text())
    spec = ModelSpec.model_validate(meta["model"])
    source = read_model_dir(spec.hf_path) if spec.hf_path else None
    dtype = dtype or (source.default_dtype() if source else None) or spec.dtype
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; choose a new directory (or --overwrite)")
    state, weights_from = checkpoint_state_dict(ckpt, spec)
    tmp = out.parent / f".{out.name}.export-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if source is not None and not source.is_pliant:
            model = _hf_model(spec, state, DTYPES[dtype])
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
            params = sum(p.numel() for p in model.parameters())
        else:
            _write_pliant(spec, state, dtype, tmp, max_shard_size)
            params = sum(v.numel() for v in state.values())
        if source is not None:
            copy_tokenizer_files(source.path, tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, int(meta["step"]), ckpt, weights_from, dtype, params, sorted(p.name for p in out.iterdir()))


__all__ = ["CheckpointError", "ExportError", "ExportResult", "export_run", "find_checkpoint"]
