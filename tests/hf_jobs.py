"""Job configs around a model directory, for the Hugging Face training and export tests."""
from __future__ import annotations

from pathlib import Path

import yaml


def hf_job_config(path: Path, model_dir: Path | None, world: int = 4, model: dict | None = None,
                  data: dict | None = None, memory_gib: float = 0.0012, **train) -> Path:
    """A CPU job of `world` gloo ranks on `model_dir` (or on pliant's own model `model`), with
    costs that make the planner mix group sizes and micro-batches, as equiv-4cpu.yaml does."""
    doc = {
        "cluster": {"name": "hf-test", "nodes": 1, "devices_per_node": world, "device": "cpu", "backend": "gloo",
                    "device_memory_gib": memory_gib,
                    "bandwidth": {"intra_node_gbps": 1.0, "inter_node_gbps": 1.0}},
        "model": {**({"hf_path": str(model_dir)} if model_dir is not None else {}), "zero_stage": 1, **(model or {})},
        "cost": {"a1_ms": 1.0e-3, "a2_ms": 0.02, "beta_ms": 1.0, "activation_bytes_per_token": 1.0e4},
        "planner": {"time_limit_s": 0.5},
        "train": {"steps": 5, "batch_tokens": 400, "max_len": 160, "lr": 2.0e-3, "min_lr": 2.0e-4, "warmup_steps": 2,
                  "grad_clip": 0.5, **train},
        "data": data or {"dist": "wikipedia-synth", "length_divisor": 8, "documents": 500},
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path
