"""A Hugging Face model directory as the planner sees it: the shape numbers of config.json and
the exact parameter count of its safetensors files, read without torch (a laptop can plan a
job for a model directory it could never load).

The runtime builds and loads the model itself (runtime/hf.py); this module only reads JSON:
config.json, the safetensors headers (8 bytes of length, then a JSON table of tensors) and
the shard index. Problems are `ModelDirError`s naming the directory, the file and what is
wrong, raised while the job config is validated, before any process starts.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

# architectures (config.json "architectures"[0]) pliant runs, and the model_type each has
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3_5ForCausalLM": "qwen3_5_text",  # hybrid: Gated DeltaNet and gated softmax layers (layer_types)
    "Qwen3NextForCausalLM": "qwen3_next",  # the same mix, fused projections, sparse MoE MLPs
    "PliantLM": "pliant",  # pliant's own hybrid linear/softmax model, as `pliant export` writes it
}
PLIANT_ARCHITECTURE = "PliantLM"
HYBRID_ARCHITECTURES = ("Qwen3_5ForCausalLM", "Qwen3NextForCausalLM")  # Gated DeltaNet layers where layer_types says
# hybrid (recurrent or linear-attention) families transformers has that pliant does not run
HYBRID_MODEL_TYPES = ("qwen3_5", "qwen3_5_moe", "jamba", "bamba", "zamba", "zamba2", "falcon_h1", "granitemoehybrid",
                      "nemotron_h", "lfm2", "lfm2_moe", "minimax", "kimi_linear", "recurrent_gemma", "mamba", "mamba2")
SAFETENSORS_INDEX = "model.safetensors.index.json"
DTYPE_NAMES = {"float64": "fp64", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class ModelDirError(InputError):
    """A model directory that pliant cannot use; the message names the directory and the problem."""


@dataclass(frozen=True)
class TensorHeader:
    file: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelDir:
    path: Path
    config: dict
    architecture: str
    tensors: dict[str, TensorHeader]  # every weight in the directory's safetensors files

    @property
    def is_pliant(self) -> bool:
        return self.architecture == PLIANT_ARCHITECTURE

    @property
    def params(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors.values())

    def spec_fields(self) -> dict:
        """The ModelSpec keys this directory fixes, in ModelSpec's names."""
        c = self.config
        heads = _int(self, "num_attention_heads")
        hidden = _int(self, "hidden_size")
        head_dim = c.get("head_dim") or hidden // heads
        fields = {
            "name": self.path.name,
            "layers": _int(self, "num_hidden_layers"),
            "hidden": hidden,
            "heads": heads,
            "kv_heads": int(c.get("num_key_value_heads") or heads),
            "head_dim": int(head_dim),
            "ffn_hidden": _int(self, "intermediate_size"),
            "vocab_size": _int(self, "vocab_size"),
            "params": float(self.params),
            "attention": list(c.get("attention_pattern", ["softmax"])) if self.is_pliant else self._layer_kinds(),
        }
        if self.is_pliant:
            fields["linear_decay"] = bool(c.get("linear_decay", True))
        if self.architecture in HYBRID_ARCHITECTURES:  # Gated DeltaNet: its own heads, dims and convolution
            fields.update(linear_kind="gated_delta", linear_heads=_int(self, "linear_num_value_heads"),
                          linear_key_heads=_int(self, "linear_num_key_heads"),
                          linear_key_dim=_int(self, "linear_key_head_dim"),
                          linear_value_dim=_int(self, "linear_value_head_dim"),
                          linear_conv=_int(self, "linear_conv_kernel_dim"), experts=int(c.get("num_experts") or 0))
        return fields

    def _layer_kinds(self) -> list[str]:
        """A hybrid model's layer pattern from its `layer_types` (linear_attention: a Gated
        DeltaNet layer); every other family is all softmax."""
        types = self.config.get("layer_types")
        if self.architecture not in HYBRID_ARCHITECTURES:
            return ["softmax"]
        kinds = {"linear_attention": "linear", "full_attention": "softmax"}
        layers = _int(self, "num_hidden_layers")
        if not isinstance(types, list) or len(types) != layers or any(t not in kinds for t in types):
            raise ModelDirError(f"{self.path / 'config.json'}: layer_types = {types!r}; expected a list of "
                                f"num_hidden_layers = {layers} entries, each one of {sorted(kinds)}")
        return [kinds[t] for t in types]

    def default_dtype(self) -> str | None:
        name = self.config.get("dtype") or self.config.get("torch_dtype")
        return DTYPE_NAMES.get(str(name)) if name else None


# config.json key of each ModelSpec field, for messages
HF_KEYS = {"layers": "num_hidden_layers", "hidden": "hidden_size", "heads": "num_attention_heads",
           "kv_heads": "num_key_value_heads", "head_dim": "head_dim", "ffn_hidden": "intermediate_size",
           "vocab_size": "vocab_size", "params": "(parameters in the safetensors files)",
           "attention": "attention_pattern", "linear_decay": "linear_decay", "linear_kind": "architectures",
           "linear_heads": "linear_num_value_heads", "linear_key_heads": "linear_num_key_heads",
           "linear_key_dim": "linear_key_head_dim", "linear_value_dim": "linear_value_head_dim",
           "linear_conv": "linear_conv_kernel_dim", "experts": "num_experts"}


def _int(d: ModelDir, key: str) -> int:
    value = d.config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelDirError(f"{d.path / 'config.json'}: {key} = {value!r}; expected a positive integer")
    return value


def read_safetensors_header(path: Path) -> dict[str, TensorHeader]:
    """The tensor table of one safetensors file (name -> dtype, shape), from its header only."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ModelDirError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100 * 1024 * 1024:
                raise ModelDirError(f"{path}: not a safetensors file (header length {n} bytes)")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelDirError(f"{path}: unreadable safetensors header ({e})") from None
    return {name: TensorHeader(path.name, meta["dtype"], tuple(meta["shape"]))
            for name, meta in header.items() if name != "__metadata__"}


def weight_files(path: Path) -> list[Path]:
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelDirError(f"{index}: unreadable shard index ({e})") from None
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelDirError(f"{index} names shards that are not in {path}: {missing[:4]}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = (f"; it has {other[:3]}: pliant reads safetensors only (convert with transformers' "
                f"save_pretrained(..., safe_serialization=True))") if other else ""
        raise ModelDirError(f"model directory {path} has no weights (no *.safetensors files){hint}")
    return files


def read_model_dir(path: str | Path) -> ModelDir:
    """config.json and the weights' headers of a model directory, checked for what pliant needs."""
    path = Path(path)
    if not path.is_dir():
        raise ModelDirError(f"model directory {path} does not exist")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelDirError(f"model directory {path} has no config.json")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ModelDirError(f"{cfg_file}: expected a JSON object")
    archs = config.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelDirError(unsupported_message(cfg_file, arch, config))
    tensors: dict[str, TensorHeader] = {}
    for f in weight_files(path):
        tensors.update(read_safetensors_header(f))
    return ModelDir(path, config, arch, tensors)


def unsupported_message(cfg_file: Path, arch, config: dict) -> str:
    """Why a directory's architecture does not run, and what does: hybrid families (layers that
    are not softmax attention, by `layer_types` or a text config's) are told the hybrids pliant runs."""
    head = f"{cfg_file}: architecture {arch!r} (model_type {config.get('model_type')!r})"
    layer_types = config.get("layer_types") or (config.get("text_config") or {}).get("layer_types") or []
    other = sorted({t for t in layer_types if isinstance(t, str)} - {"full_attention", "sliding_attention"})
    if other or config.get("model_type") in HYBRID_MODEL_TYPES:
        kinds = f" (its layer_types hold {other})" if other else ""
        vlm = (" (a Qwen3.5 vision-language directory: save its language model as Qwen3_5ForCausalLM)"
               if config.get("model_type") == "qwen3_5" else "")
        return (f"{head} is a hybrid family pliant does not run{kinds}; pliant runs the Gated DeltaNet hybrids "
                f"{', '.join(f'{a} ({SUPPORTED_ARCHITECTURES[a]})' for a in HYBRID_ARCHITECTURES)} and its own "
                f"{PLIANT_ARCHITECTURE}{vlm}")
    return f"{head} is not supported; pliant runs {', '.join(SUPPORTED_ARCHITECTURES)}"


def fill_model_fields(data: dict) -> dict:
    """ModelSpec's input with the fields a `hf_path` directory fixes filled in; a field the
    config also sets must agree (one source of truth, named in the error)."""
    d = read_model_dir(data["hf_path"])
    out = dict(data)
    for key, value in d.spec_fields().items():
        if key == "name":
            out.setdefault("name", value)
            continue
        given = out.get(key)
        if given is None:
            out[key] = value
        elif (list(given) if isinstance(given, (list, tuple)) else given) != value:
            raise ModelDirError(f"{key} = {given!r} disagrees with the model directory: {HF_KEYS[key]} = {value!r} "
                                f"in {d.path / 'config.json'} (remove {key} from the job config, or fix it)")
    if out.get("dtype") is None:
        dtype = d.default_dtype()
        if dtype is None:
            raise ModelDirError(f"{d.path / 'config.json'} gives no dtype; set model.dtype (fp32, bf16, fp16, fp64)")
        out["dtype"] = dtype
    return out
