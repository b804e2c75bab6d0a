"""Hugging Face models under pliant's SP, through transformers' attention-function registry.

transformers owns the model definition: embeddings, RoPE with the family's `rope_theta` and
`rope_scaling`, GQA, Qwen2's q/k/v biases, Qwen3's q/k norms, RMSNorm eps, tied embeddings.
pliant registers one attention function, "pliant" (`AttentionInterface`, the hook DeepSpeed's
ALST and verl use), and runs the model with it: every softmax layer hands it q, k, v, which
transformers has already projected and rotated at the per-rank `position_ids` the runtime
passes, and the function forwards them to the `SeqContext` the runtime attached to the call
(`pliant_ctx=`), which runs the SP form the plan chose for the step's group (Ulysses or
LASP-2H). No attention mask is
built: the pack layout is the mask (causal, never across documents).

Why the registry and not a port of each family into pliant's own code: the model stays
transformers' own (the same code users fine-tune and export with), every family and RoPE
variant transformers knows is right by construction, and the only piece pliant adds is the
one SP already owns. pliant's own hybrid model calls the same `SeqContext` from its layers.

`HFCausalLM` adapts a transformers model to pliant's model contract, `forward(tokens, ctx) ->
logits`, for one packed rank-local sequence.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from pliant.planner.model_dir import HF_KEYS, ModelDir, ModelDirError, read_model_dir
from pliant.planner.spec import ModelSpec

from .context import SeqContext
from .gdn import attach_gdn

ATTENTION = "pliant"
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pliant_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask, scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """transformers' attention-function contract: q [1, H, T, d], k, v [1, Hkv, T, d] ->
    ([1, T, H, d], None). The SP operator comes from the call's `pliant_ctx`."""
    ctx: SeqContext | None = kwargs.get("pliant_ctx")  # or generation's CacheContext (runtime/generate.py)
    if ctx is None:
        raise RuntimeError("the 'pliant' attention runs only under pliant's runtime: call the model with "
                           "pliant_ctx=SeqContext(...) (HFCausalLM does)")
    if query.shape[0] != 1:
        raise ValueError(f"pliant attention takes one packed sequence per call (batch 1), got batch {query.shape[0]}")
    if dropout:
        raise ValueError(f"attention dropout {dropout} is not supported under pliant's SP attention")
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    if window is not None and ctx.max_length > window:
        raise ValueError(f"a sequence of {ctx.max_length} tokens is longer than the model's sliding window "
                         f"({window}); pliant's SP attention is full causal attention")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, H, d]
    # the layer index: a decode context keeps one key-value cache per layer
    out = ctx.softmax_attention(q, k, v, scale=scaling, layer=getattr(module, "layer_idx", None))
    return out.unsqueeze(0), None


def register_attention() -> None:
    """Make "pliant" a valid `attn_implementation` (idempotent; every process that loads a model)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, pliant_attention)


class HFCausalLM(nn.Module):
    """A transformers causal LM with pliant's model contract: this rank's packed tokens [T] and
    the step's SeqContext -> logits [T, vocab]. The wrapped model is `self.hf`; its state dict
    keys are the Hugging Face ones under the `hf.` prefix."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model

    @property
    def vocab_size(self) -> int:
        return int(self.hf.config.vocab_size)

    def train(self, mode: bool = True) -> "HFCausalLM":
        """Also makes sure every Gated DeltaNet layer still runs pliant's forward: anything that
        re-binds a module's forward on a mode change (transformers' kernelization) must not put
        the layer's own whole-row recurrence back under SP."""
        super().train(mode)
        attach_gdn(self.hf)
        return self

    def forward(self, tokens: torch.Tensor, ctx: SeqContext, logits_to_keep: int = 0) -> torch.Tensor:
        """`logits_to_keep`: 0 for every token's logits, n for the last n only (generation's
        prefill runs for the decode cache, not the logits)."""
        out = self.hf(input_ids=tokens[None], position_ids=ctx.positions[None], pliant_ctx=ctx, use_cache=False,
                      logits_to_keep=logits_to_keep)
        return out.logits[0]


def _check_shapes(d: ModelDir, model: nn.Module) -> None:
    """Every tensor of the directory against the shape the config gives (before any load)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, t in d.tensors.items():
        want = expected.get(name)
        if want is not None and want != t.shape:
            raise ModelDirError(f"{d.path / t.file}: tensor {name} has shape {list(t.shape)}, but config.json gives "
                                f"{list(want)} ({', '.join(f'{HF_KEYS[k]}={v}' for k, v in _shape_keys(d).items())})")


def _shape_keys(d: ModelDir) -> dict:
    f = d.spec_fields()
    return {k: f[k] for k in ("hidden", "heads", "kv_heads", "head_dim", "ffn_hidden", "vocab_size")}


def check_tokenizer(path: Path, vocab_size: int) -> None:
    """A tokenizer in the directory must not produce ids beyond the model's embedding."""
    from .tokenizer import TOKENIZER_FILES, load_tokenizer

    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return
    tok = load_tokenizer(path)
    if len(tok) > vocab_size:
        raise ModelDirError(f"{path}: the tokenizer has {len(tok)} tokens, more than the model's embedding "
                            f"(vocab_size {vocab_size} in config.json): its ids would index past the embedding")


def load_hf_model(path: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu") -> HFCausalLM:
    """The model of a Llama / Qwen2 / Qwen3 / Mistral directory with its weights, running its
    softmax attention through pliant's SP operators."""
    import transformers
    from transformers import AutoModelForCausalLM

    d = read_model_dir(path)
    if d.is_pliant:
        raise ModelDirError(f"{d.path} holds pliant's own model; build it with build_model")
    register_attention()
    _check_hf_dir(d)
    transformers.logging.set_verbosity_error()  # the per-load notices and progress bars: not once per rank
    transformers.logging.disable_progress_bar()
    # MoE blocks (Qwen3-Next) run as transformers' own modules, replicated like a dense MLP; its
    # default grouped GEMM takes no float64, so float64 (the exactness tests) runs its per-expert loop
    experts = {"experts_implementation": "eager"} if dtype == torch.float64 else {}
    try:  # use_kernels=False: no hub kernels (downloads), and no re-kernelization on train()/eval(),
        # which would put transformers' own Gated DeltaNet forward back in place of pliant's
        model, info = AutoModelForCausalLM.from_pretrained(d.path, dtype=dtype, attn_implementation=ATTENTION,
                                                           output_loading_info=True, use_kernels=False, **experts)
    except OSError as e:
        if e.errno is not None:  # the file system failed this process (EIO, a lost mount): a fault, not bad input
            raise
        raise ModelDirError(f"{d.path}: transformers could not load the model: {e}") from None
    except (ValueError, RuntimeError) as e:
        raise ModelDirError(f"{d.path}: transformers could not load the model: {e}") from None
    missing = [k for k in info.get("missing_keys", [])]
    unexpected = [k for k in info.get("unexpected_keys", []) if not k.endswith("rotary_emb.inv_freq")]
    mismatched = info.get("mismatched_keys", [])
    if missing or unexpected or mismatched:
        raise ModelDirError(f"{d.path}: the weights do not match config.json: missing {sorted(missing)[:6]}, "
                            f"unexpected {sorted(unexpected)[:6]}, mismatched {list(mismatched)[:6]}")
    model.config.use_cache = False
    attach_gdn(model)  # Gated DeltaNet layers (Qwen3.5, Qwen3-Next) run their SP core through the context
    return HFCausalLM(model).to(device)


def _check_hf_dir(d: ModelDir) -> None:
    """What a Hugging Face directory must satisfy before its weights load: no attention dropout,
    a tokenizer within the embedding, every tensor of the shape config.json gives."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(d.path)
    except (OSError, ValueError, KeyError) as e:
        raise ModelDirError(f"{d.path / 'config.json'}: transformers cannot read it: {e}") from None
    if getattr(config, "attention_dropout", 0.0):
        raise ModelDirError(f"{d.path / 'config.json'}: attention_dropout = {config.attention_dropout}; pliant's SP "
                            f"attention has no dropout (set it to 0.0)")
    check_tokenizer(d.path, int(config.vocab_size))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    _check_shapes(d, skeleton)


def _check_pliant_dir(d: ModelDir, spec: ModelSpec) -> None:
    from .model import LM, ROPE_THETA, RMS_EPS

    for key, ours in (("rope_theta", ROPE_THETA), ("rms_norm_eps", RMS_EPS)):
        if d.config.get(key, ours) != ours:
            raise ModelDirError(f"{d.path / 'config.json'}: {key} = {d.config[key]}; pliant's model implements {ours}")
    with torch.device("meta"):
        skeleton = LM(spec)
    _check_shapes(d, skeleton)
    missing = sorted(set(skeleton.state_dict()) - set(d.tensors))
    unexpected = sorted(set(d.tensors) - set(skeleton.state_dict()))
    if missing or unexpected:
        raise ModelDirError(f"{d.path}: the weights do not match config.json: missing {missing[:6]}, "
                            f"unexpected {unexpected[:6]}")


def check_model(spec: ModelSpec) -> None:
    """The model directory a job names (model.hf_path), checked without loading a weight: what
    `build_model` would refuse, raised as a ModelDirError before any rank starts."""
    if spec.hf_path is None:
        return
    d = read_model_dir(spec.hf_path)
    if d.is_pliant:
        _check_pliant_dir(d, spec)
    else:
        _check_hf_dir(d)


def build_model(spec: ModelSpec, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """The model a job config describes: loaded from `hf_path` when given (a Hugging Face
    directory, or one `pliant export` wrote of pliant's own model), else pliant's own hybrid
    model, freshly initialised from the current torch seed."""
    from .model import LM

    dtype = dtype or DTYPES[spec.dtype]
    if spec.hf_path is None:
        return LM(spec).to(device=device, dtype=dtype)
    d = read_model_dir(spec.hf_path)
    if not d.is_pliant:
        return load_hf_model(d.path, dtype, device)
    return load_pliant_dir(d, spec, dtype, device)


def load_pliant_dir(d: ModelDir, spec: ModelSpec, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    from safetensors.torch import load_file

    from .model import LM

    _check_pliant_dir(d, spec)
    state: dict[str, torch.Tensor] = {}
    for f in dict.fromkeys(t.file for t in d.tensors.values()):
        state.update(load_file(d.path / f))
    model = LM(spec)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelDirError(f"{d.path}: the weights do not match config.json: missing {sorted(missing)[:6]}, "
                            f"unexpected {sorted(unexpected)[:6]}")
    return model.to(device=device, dtype=dtype)
