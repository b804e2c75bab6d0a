"""Tokenizers as Hugging Face directories: load one, or train a small byte-level BPE.

A model directory carries its tokenizer (tokenizer.json + tokenizer_config.json +
special_tokens_map.json), and that is the unit pliant reads and writes: `pliant data
prepare` tokenizes corpora with it, and tests everywhere train a tiny one here instead of
downloading one (these machines never reach the hub).

`train_bpe_tokenizer` makes a GPT-2-style byte-level BPE (any text is encodable, so no
`<unk>` is needed) with the conventional special tokens `<s>` (beginning of sequence),
`</s>` (end of sequence) and `<pad>`; encoding with special tokens prepends `<s>`, as
Llama-family tokenizers do. Documents get their `</s>` from `pliant data prepare`.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from pliant.runtime.data import DataError

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (BOS, EOS, PAD)  # ids 0, 1, 2 in a trained tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")  # any one: a tokenizer
# what a model directory carries of its tokenizer (copied by `pliant export` and `pliant model init`)
TOKENIZER_DIR_FILES = TOKENIZER_FILES + ("special_tokens_map.json", "merges.txt", "added_tokens.json",
                                         "chat_template.jinja")


class TokenizerError(DataError):
    """A tokenizer directory that cannot be used; the message names the directory."""


def load_tokenizer(directory: str | Path):
    """The directory's fast (Rust-backed) tokenizer, through transformers' AutoTokenizer.

    Fails clearly (naming the directory) when it holds no tokenizer files, instead of
    AutoTokenizer's attempt to reach the hub with the path as a repository name."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not directory.is_dir():
        raise TokenizerError(f"tokenizer directory {directory} does not exist")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise TokenizerError(f"{directory} holds no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})")
    try:
        tok = AutoTokenizer.from_pretrained(str(directory), use_fast=True, local_files_only=True)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{directory}: cannot load its tokenizer ({e})") from None
    if getattr(tok, "backend_tokenizer", None) is None:
        raise TokenizerError(f"{directory}: the tokenizer is not a fast (tokenizers) tokenizer")
    return tok


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path, *, min_frequency: int = 2,
                        add_bos: bool = True, model_max_length: int = 1 << 20):
    """Train a byte-level BPE of (at most) `vocab_size` tokens on `texts`, save it as a
    Hugging Face tokenizer directory in `out_dir` and return it (a PreTrainedTokenizerFast).

    The vocabulary can come out smaller than `vocab_size` when the texts hold fewer
    mergeable pairs; `len(tokenizer)` is the size to give a model's embedding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise TokenizerError(f"vocab_size {vocab_size} is too small for a byte-level BPE "
                             f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer)
    steps: list = [processors.ByteLevel(trim_offsets=False)]
    if add_bos:
        bos_id = backend.token_to_id(BOS)
        steps.append(processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                   special_tokens=[(BOS, bos_id)]))
    backend.post_processor = processors.Sequence(steps)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                  model_max_length=model_max_length)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    _portable_config(out_dir)
    return tok


def _portable_config(out_dir: Path) -> None:
    """transformers 5 names its own class (TokenizersBackend) in tokenizer_config.json and
    writes no special_tokens_map.json; name the class every 4.x and 5.x release knows and
    write the map, so older consumers of the directory (inference servers pinned to 4.x)
    load it too."""
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer files of one directory into another; returns the names copied."""
    import shutil

    src, dst = Path(src), Path(dst)
    copied = []
    for name in TOKENIZER_DIR_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
