"""The built-in arithmetic task: small sums and differences, a dataset task end to end on CPU.

`prepare_arithmetic(out_dir)` writes

    out_dir/train.jsonl     {"question": "What is 12 + 7?", "answer": "19"}, ...
    out_dir/test.jsonl      problems that are not in train.jsonl
    out_dir/policy/         a tiny random-initialised Llama (config.json, model.safetensors,
                            generation_config.json) with a byte-level BPE tokenizer trained on
                            the problems and a chat template ("<|user|>\\n...\\n<|assistant|>\\n")

and `reward` checks an answer: 1.0 when the last integer of the response is the row's answer.
A job config for it (the model section reads the rest of its shape from the directory):

    model: {name: arithmetic, hf_path: OUT/policy, zero_stage: 0, dtype: fp32, attention: [softmax]}
    task:
      kind: dataset
      dataset: OUT/train.jsonl
      eval_dataset: OUT/test.jsonl
      prompt_key: question
      answer_key: answer
      chat_template: true
      max_response_tokens: 8
    rl:
      reward_fn: pliant.rl.arithmetic:reward
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .reward import RewardSample

CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
_INTEGER = re.compile(r"-?\d+")


def problems(max_operand: int = 20) -> list[dict[str, str]]:
    """Every problem a + b and a - b (a >= b: answers are never negative) with 0 <= a, b <=
    max_operand, in a fixed order."""
    out = []
    for a in range(max_operand + 1):
        for b in range(max_operand + 1):
            out.append({"question": f"What is {a} + {b}?", "answer": str(a + b)})
            if a >= b:
                out.append({"question": f"What is {a} - {b}?", "answer": str(a - b)})
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    from pliant.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def write_arithmetic(out_dir: str | Path, train: int = 1000, test: int = 100, seed: int = 0,
                     max_operand: int = 20) -> tuple[Path, Path]:
    """Write out_dir/train.jsonl (`train` rows) and out_dir/test.jsonl (`test` rows): problems
    shuffled by `seed`, the test problems never among the training ones (training rows repeat
    when `train` is larger than the problems left). Returns the two paths."""
    pool = problems(max_operand)
    if test >= len(pool):
        raise ValueError(f"test={test}: there are only {len(pool)} problems with operands up to {max_operand}; "
                         f"a larger max_operand makes more")
    if train < 1:
        raise ValueError(f"train={train}: need at least one training problem")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pool))
    test_rows = [pool[i] for i in order[:test]]
    rest = order[test:]
    train_rows = [pool[rest[k % len(rest)]] for k in range(train)]
    rng.shuffle(train_rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "train.jsonl", train_rows)
    _write_jsonl(out / "test.jsonl", test_rows)
    return out / "train.jsonl", out / "test.jsonl"


def last_integer(text: str) -> int | None:
    found = _INTEGER.findall(text)
    return int(found[-1]) if found else None


def reward(sample: RewardSample) -> float:
    """1.0 when the last integer in the response is the row's answer, else 0.0 (no integer: 0)."""
    got = last_integer(sample.response)
    return 1.0 if got is not None and got == int(sample.row["answer"]) else 0.0


@dataclass(frozen=True)
class ArithmeticFiles:
    train: Path
    test: Path
    policy: Path  # the model directory


def write_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    """A byte-level BPE trained on `texts`, with CHAT_TEMPLATE, saved to out_dir."""
    from pliant.runtime.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(texts, vocab_size, out_dir)
    tok.chat_template = CHAT_TEMPLATE
    # what transformers' save_pretrained writes for a chat template; train_bpe_tokenizer has
    # already made tokenizer_config.json portable, so it is not saved again
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return tok


def prepare_arithmetic(out_dir: str | Path, train: int = 1000, test: int = 100, seed: int = 0, max_operand: int = 20,
                       vocab_size: int = 384, family: str = "llama", hidden: int = 64, layers: int = 2, heads: int = 4,
                       kv_heads: int = 2, ffn_hidden: int = 192, overwrite: bool = False) -> ArithmeticFiles:
    """The dataset (write_arithmetic) and a tiny random-initialised model directory under
    out_dir/policy (write_policy)."""
    out = Path(out_dir)
    policy = out / "policy"
    if policy.exists() and not overwrite:
        raise FileExistsError(f"{policy} exists; pass overwrite=True to replace it")
    train_path, test_path = write_arithmetic(out, train, test, seed, max_operand)
    rows = [json.loads(line) for line in train_path.read_text().splitlines()]
    write_policy(policy, [(r["question"], r["answer"]) for r in rows], vocab_size, family, seed, hidden=hidden,
                 layers=layers, heads=heads, kv_heads=kv_heads, ffn_hidden=ffn_hidden)
    return ArithmeticFiles(train_path, test_path, policy)


def write_policy(policy: Path, examples: list[tuple[str, str]], vocab_size: int, family: str, seed: int,
                 **shape) -> Path:
    """A tiny random-initialised model directory at `policy`, as `pliant model init` makes one
    (runtime/scaffold.py) but with the tokenizer trained on the task's (prompt, answer) pairs
    as the policy will see them (chat template applied, answer after). The directory appears
    whole or not at all: it is written beside its place and renamed into it (an existing one
    is replaced)."""
    import torch
    from jinja2 import Template

    from pliant.runtime.scaffold import write_tiny_model

    tmp = policy.parent / f".{policy.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        render = Template(CHAT_TEMPLATE)
        texts = [render.render(messages=[{"role": "user", "content": q}], add_generation_prompt=True,
                               bos_token="") + a for q, a in examples]
        tok = write_tokenizer(texts, vocab_size, tmp)
        vocab = -(-len(tok) // 64) * 64  # the embedding rounded up to a multiple of 64, as `pliant model init` does
        write_tiny_model(family, tmp, vocab, seed=seed, dtype=torch.float32, tokenizer_dir=tmp, **shape)
        if policy.exists():
            old = policy.parent / f".{policy.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            policy.rename(old)
            tmp.rename(policy)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(policy)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return policy
