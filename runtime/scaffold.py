"""Tiny random-initialised Hugging Face model directories, made locally (no downloads): the
models of the tests, and the starting point of the README's "train your own model" example
(`pliant model init`).

Each family is written by transformers' own config class and `save_pretrained`, so the
directory is exactly what a user's Llama / Qwen / Mistral directory looks like, only small.
The tiny configs switch on what distinguishes the families: GQA everywhere, Llama 3's
`rope_scaling` and untied embeddings, Qwen2's q/k/v biases and tied embeddings, Qwen3's q/k
norms with a head_dim that is not hidden / heads, Mistral's RoPE base.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .tokenizer import copy_tokenizer_files

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")  # all-softmax
HYBRID_FAMILIES = ("qwen3_5", "qwen3_next")  # Gated DeltaNet + gated softmax layers (Qwen3-Next: MoE MLPs)

if TYPE_CHECKING:  # torch is imported where a model is written: the command line's parser reads the names above
    import torch


def tiny_config(family: str, vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                ffn_hidden: int = 96, **extra):
    """A transformers config of the family, small enough for CPU tests."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn_hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                  rms_norm_eps=1e-5, attention_dropout=0.0)
    if family == "llama":
        cfg = LlamaConfig(**common, tie_word_embeddings=False,
                          rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 256})
    elif family == "qwen2":
        cfg = Qwen2Config(**common, tie_word_embeddings=True, use_sliding_window=False,
                          rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    elif family == "qwen3":
        cfg = Qwen3Config(**common, head_dim=hidden // heads * 2, tie_word_embeddings=True, use_sliding_window=False,
                          rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    elif family == "qwen3_5":  # three Gated DeltaNet layers per gated softmax layer; more value heads than key heads
        from transformers import Qwen3_5TextConfig

        pattern = ("linear_attention", "linear_attention", "linear_attention", "full_attention")
        cfg = Qwen3_5TextConfig(**common, head_dim=hidden // heads, tie_word_embeddings=False,
                                layer_types=[pattern[i % 4] for i in range(layers)],
                                linear_conv_kernel_dim=4, linear_key_head_dim=hidden // heads,
                                linear_value_head_dim=hidden // heads, linear_num_key_heads=max(1, heads // 2),
                                linear_num_value_heads=heads,
                                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                                 "partial_rotary_factor": 0.5})
    elif family == "qwen3_next":  # Qwen3.5's layer mix with fused projections and sparse MoE MLPs (shared expert)
        from transformers import Qwen3NextConfig

        pattern = ("linear_attention", "linear_attention", "linear_attention", "full_attention")
        cfg = Qwen3NextConfig(**common, head_dim=hidden // heads, tie_word_embeddings=False,
                              layer_types=[pattern[i % 4] for i in range(layers)],
                              linear_conv_kernel_dim=4, linear_key_head_dim=hidden // heads,
                              linear_value_head_dim=hidden // heads, linear_num_key_heads=max(1, heads // 2),
                              linear_num_value_heads=heads, num_experts=4, num_experts_per_tok=2,
                              moe_intermediate_size=ffn_hidden // 2, shared_expert_intermediate_size=ffn_hidden // 2,
                              decoder_sparse_step=1, mlp_only_layers=[1] if layers > 1 else [],
                              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                               "partial_rotary_factor": 0.5})
    elif family == "mistral":
        cfg = MistralConfig(**common, sliding_window=None, tie_word_embeddings=False,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    else:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES + HYBRID_FAMILIES)}")
    for key, value in extra.items():
        setattr(cfg, key, value)
    return cfg


def write_tiny_model(family: str, out: str | Path, vocab_size: int, seed: int = 0, dtype: "torch.dtype | None" = None,
                     tokenizer_dir: str | Path | None = None, **shape) -> Path:
    """Write a random-initialised model of the family to `out` (config.json, model.safetensors,
    generation_config.json), with the tokenizer files of `tokenizer_dir` beside it."""
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    out = Path(out)
    cfg = tiny_config(family, vocab_size, **shape)
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(cfg, key, getattr(tok, key))
    import torch

    dtype = dtype or torch.float32
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    with torch.no_grad():  # transformers starts biases at 0 and norms at 1: make them matter in tests
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.generation_config = GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                                               pad_token_id=cfg.pad_token_id)
    model.save_pretrained(out)
    if tokenizer_dir is not None and Path(tokenizer_dir).resolve() != out.resolve():
        copy_tokenizer_files(tokenizer_dir, out)
    return out
