"""`pliant export` (a run's checkpoint as a Hugging Face model directory) and `pliant model
init` (a tiny random-initialised model directory with a BPE tokenizer trained on your corpus,
for trying pliant end to end on CPU without downloads)."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def add_model_commands(sub) -> None:
    e = sub.add_parser("export", help="write a run's checkpoint as a Hugging Face model directory "
                                      "(transformers' AutoModelForCausalLM loads it)")
    e.add_argument("--run-dir", required=True, help="the run directory of `pliant train` (RUN/checkpoints/...)")
    e.add_argument("--step", type=int, default=None, help="the checkpoint's step (default: the newest complete one)")
    e.add_argument("--out", required=True, help="the model directory to write")
    e.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "fp64"], default=None,
                   help="weights' dtype (default: the source model directory's, else the training dtype)")
    e.add_argument("--max-shard-size", default="5GB", help="safetensors shard size; larger models get an index")
    e.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    m = sub.add_parser("model", help="model directories")
    msub = m.add_subparsers(dest="model_command", required=True)
    i = msub.add_parser("init", help="a tiny random-initialised Hugging Face model directory and a byte-level BPE "
                                     "tokenizer trained on a corpus (no downloads)")
    from pliant.runtime.scaffold import FAMILIES, HYBRID_FAMILIES

    i.add_argument("--family", choices=FAMILIES + HYBRID_FAMILIES, default="llama",
                   help=f"all softmax attention: {', '.join(FAMILIES)}; hybrid (three Gated DeltaNet layers per "
                        f"gated softmax layer): {', '.join(HYBRID_FAMILIES)} (qwen3_next with sparse MoE MLPs)")
    i.add_argument("--corpus", nargs="+", required=True, metavar="FILE",
                   help="JSONL, JSONL.gz or Parquet files the tokenizer is trained on")
    i.add_argument("--text-key", default="text")
    i.add_argument("--out", required=True, help="the model directory to write")
    i.add_argument("--vocab-size", type=int, default=4096, help="tokenizer vocabulary (at most)")
    i.add_argument("--tokenizer-docs", type=int, default=20000, help="documents the tokenizer is trained on")
    i.add_argument("--hidden", type=int, default=128)
    i.add_argument("--layers", type=int, default=4)
    i.add_argument("--heads", type=int, default=4)
    i.add_argument("--kv-heads", type=int, default=2)
    i.add_argument("--ffn-hidden", type=int, default=384)
    i.add_argument("--seed", type=int, default=0)


def cmd_export(args: argparse.Namespace) -> int:
    from pliant.runtime.export import export_run

    r = export_run(args.run_dir, args.out, args.step, args.dtype, args.max_shard_size, args.overwrite)
    print(f"exported step {r.step} of {args.run_dir} ({r.checkpoint.name}, {r.weights_from}, {r.params:,} parameters, "
          f"{r.dtype}) to {r.out}: {', '.join(r.files)}")
    return 0


def cmd_model_init(args: argparse.Namespace) -> int:
    import itertools

    import torch

    from pliant.runtime.corpus import check_inputs, iter_text_batches
    from pliant.runtime.scaffold import write_tiny_model
    from pliant.runtime.tokenizer import train_bpe_tokenizer

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose a new directory")
    shape = dict(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                 ffn_hidden=args.ffn_hidden)
    check_hybrid_shape(args.family, args.vocab_size, shape)
    paths = check_inputs(args.corpus)
    texts = itertools.chain.from_iterable(b.texts for b in iter_text_batches(paths, args.text_key, 1024))
    tmp = out.parent / f".{out.name}.init-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tok = train_bpe_tokenizer(itertools.islice(texts, args.tokenizer_docs), args.vocab_size, tmp)
        vocab = -(-len(tok) // 64) * 64  # the embedding rounded up to a multiple of 64, as model configs do
        write_tiny_model(args.family, tmp, vocab, seed=args.seed, dtype=torch.float32, tokenizer_dir=tmp, **shape)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {out}: a random-initialised {args.family} model ({args.layers} layers, hidden {args.hidden}, "
          f"vocab {vocab}) and a byte-level BPE tokenizer of {len(tok)} tokens")
    return 0


def check_hybrid_shape(family: str, vocab_size: int, shape: dict) -> None:
    """Refuse, before the tokenizer trains, a hybrid shape that transformers cannot run: the
    gated softmax layer comes every 4th layer (with none, its cached forward fails building the
    attention mask), and each Gated DeltaNet key head must serve a whole number of value heads."""
    from pliant.planner.model_dir import ModelDirError
    from pliant.runtime.scaffold import HYBRID_FAMILIES, tiny_config

    if family not in HYBRID_FAMILIES:
        return
    cfg = tiny_config(family, vocab_size, **shape)
    if "full_attention" not in cfg.layer_types:
        raise ModelDirError(f"--layers {shape['layers']}: {family} has a gated softmax layer every 4th layer; with "
                            f"none, transformers' forward (with its default cache) fails: use --layers 4 or more")
    if cfg.linear_num_value_heads % cfg.linear_num_key_heads:
        raise ModelDirError(f"--heads {shape['heads']}: {family}'s Gated DeltaNet layers get "
                            f"{cfg.linear_num_key_heads} key heads for {cfg.linear_num_value_heads} value heads, "
                            f"not a multiple; use an even --heads (or 1)")


def run_model_command(args: argparse.Namespace) -> int | None:
    """The exit status of `export` / `model ...`, or None for other commands."""
    if args.command == "export":
        return cmd_export(args)
    if args.command == "model" and args.model_command == "init":
        return cmd_model_init(args)
    return None
