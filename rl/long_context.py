"""The built-in long-context task: a retrieval question over a long generated context whose
length follows a long tail, as RL post-training's prompts do (most of a few hundred tokens, a
few of several thousand).

    context   filler sentences ("the old boat sees a green hill.") with a fact among them
              ("the code of nova is:7.") at a random place
    question  "what is the code of nova?"                       answer "7"

`prepare_long_context(out_dir)` writes, like `pliant data arithmetic`,

    out_dir/train.jsonl     {"prompt": "...", "answer": "7", "sentences": 212}, ...
    out_dir/test.jsonl      held-out rows (drawn apart from the training ones)
    out_dir/sft.jsonl       the supervised warm start's rows: the same questions over short
                            contexts (task.sft_dataset), as a policy's instruction data is not
                            its RL prompts
    out_dir/policy/         a tiny random-initialised Llama with a byte-level BPE tokenizer
                            trained on the rows and a chat template

and `reward` checks an answer: 1.0 when the first integer of the response is the code asked
for (a single digit: a guess is right one time in ten). `facts` > 1 adds facts about other
names (a key-value lookup).

What the tiny policy learns from its supervised warm start (sft.jsonl's short contexts, 16 a
step, lr 3e-3; held out on test.jsonl; measured while the task was designed): it learns to find
the fact and copy its code abruptly, between about 100 and 250 steps (0.27 held out at 100
steps, 0.79 at 125, 0.88-0.99 from 250), so `configs/rl-long.yaml` stops it at 100 steps and RL
finishes the job on the long-tailed contexts. Harder variants did not learn in a warm start of
this size: three facts per context with two-digit codes (nothing in 2,000 steps), two-digit
codes (a transition anywhere from 500 to past 1,500 steps), and filler sentences holding counts
written like the codes (a plateau at 0.12-0.18 from 150 to 1,200 steps, which 60-80 RL steps
did not move).

The sentence count is a lognormal body with a Pareto tail, capped; `configs/rl-long.yaml`
trains on it with a learner whose memory does not hold the longest prompts on one rank.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .arithmetic import _write_jsonl, write_policy
from .reward import RewardSample

NAMES = ("nova", "orin", "pike", "luma", "tarn", "vela", "brix", "cora", "dune", "echo", "fenn", "gale",
         "hale", "iris", "jade", "kite")
ADJECTIVES = ("old", "red", "small", "green", "quiet", "bright", "cold", "tall", "soft", "dark")
NOUNS = ("boat", "hill", "river", "stone", "bird", "tree", "road", "house", "cloud", "field", "lamp", "wall")
VERBS = ("sees", "finds", "passes", "follows", "holds", "meets", "leaves", "builds")
_INTEGER = re.compile(r"\d+")


@dataclass(frozen=True)
class LengthTail:
    """Sentences per context: lognormal around `median` (spread `sigma`) with probability
    1 - tail_share, else Pareto from `tail_start` with index `alpha`; within [minimum, maximum]."""

    median: float = 24.0
    sigma: float = 0.5
    tail_share: float = 0.08
    tail_start: int = 80
    alpha: float = 1.1
    minimum: int = 4
    maximum: int = 480

    def draw(self, rng: np.random.Generator) -> int:
        if rng.random() < self.tail_share:
            n = self.tail_start * (1.0 - rng.random()) ** (-1.0 / self.alpha)
        else:
            n = math.exp(math.log(self.median) + self.sigma * rng.standard_normal())
        return int(min(self.maximum, max(self.minimum, round(n))))


def _sentence(rng: np.random.Generator) -> str:
    a, b = rng.choice(ADJECTIVES, 2)
    return f"the {a} {rng.choice(NOUNS)} {rng.choice(VERBS)} a {b} {rng.choice(NOUNS)}."


CODES = range(0, 10)  # a fact's code: one digit, as the filler's counts
SFT_TAIL = LengthTail(median=4.0, sigma=0.5, tail_share=0.0, minimum=1, maximum=16)  # sft.jsonl's short contexts


def make_row(rng: np.random.Generator, tail: LengthTail, facts: int = 1, codes: range = CODES) -> dict:
    """One prompt: a context of `tail.draw` filler sentences and `facts` facts about distinct
    names with distinct codes, and a question about one of them."""
    n = tail.draw(rng)
    names = rng.choice(NAMES, facts, replace=False)
    codes = rng.choice(np.asarray(codes), facts, replace=False)
    sentences = [_sentence(rng) for _ in range(n)]
    for name, code in zip(names, codes):
        # "is:7": the code is the pre-token "7", as in the answer (" 7" would be another token)
        sentences.insert(int(rng.integers(0, len(sentences) + 1)), f"the code of {name} is:{code}.")
    asked = int(rng.integers(facts))
    prompt = " ".join(sentences) + f"\nwhat is the code of {names[asked]}?"
    return {"prompt": prompt, "answer": str(codes[asked]), "sentences": n}


def write_long_context(out_dir: str | Path, train: int = 2000, test: int = 200, sft: int = 5000, seed: int = 0,
                       tail: LengthTail = LengthTail(), facts: int = 1) -> tuple[Path, Path, Path]:
    """out_dir/train.jsonl, test.jsonl (contexts of `tail`'s lengths) and sft.jsonl (short
    contexts), drawn from separate seeded streams."""
    if train < 1 or test < 1 or sft < 1:
        raise ValueError(f"train={train}, test={test}, sft={sft}: need at least one row of each")
    if not 1 <= facts <= len(NAMES):
        raise ValueError(f"facts={facts}: between 1 and {len(NAMES)} (the names there are)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    streams = np.random.SeedSequence(seed).spawn(3)
    for name, stream, k, lengths in (("train", streams[0], train, tail), ("test", streams[1], test, tail),
                                     ("sft", streams[2], sft, SFT_TAIL)):
        rng = np.random.default_rng(stream)
        _write_jsonl(out / f"{name}.jsonl", [make_row(rng, lengths, facts) for _ in range(k)])
    return out / "train.jsonl", out / "test.jsonl", out / "sft.jsonl"


def first_integer(text: str) -> int | None:
    found = _INTEGER.search(text)
    return int(found.group()) if found else None


def reward(sample: RewardSample) -> float:
    """1.0 when the first integer in the response is the row's code, else 0.0."""
    got = first_integer(sample.response)
    return 1.0 if got is not None and got == int(sample.row["answer"]) else 0.0


@dataclass(frozen=True)
class LongContextFiles:
    train: Path
    test: Path
    sft: Path
    policy: Path


def prepare_long_context(out_dir: str | Path, train: int = 2000, test: int = 200, seed: int = 0,
                         vocab_size: int = 384, family: str = "llama", hidden: int = 64, layers: int = 2,
                         heads: int = 4, kv_heads: int = 2, ffn_hidden: int = 192, max_context: int = 8192,
                         facts: int = 1, overwrite: bool = False) -> LongContextFiles:
    """The dataset (write_long_context) and a tiny policy directory (rl/arithmetic.py's
    write_policy) whose context holds the longest prompts."""
    out = Path(out_dir)
    policy = out / "policy"
    if policy.exists() and not overwrite:
        raise FileExistsError(f"{policy} exists; pass overwrite=True to replace it")
    train_path, test_path, sft_path = write_long_context(out, train, test, seed=seed, facts=facts)
    rows = [json.loads(line) for line in train_path.read_text().splitlines()]
    write_policy(policy, [(r["prompt"], r["answer"]) for r in rows], vocab_size, family, seed, hidden=hidden,
                 layers=layers, heads=heads, kv_heads=kv_heads, ffn_hidden=ffn_hidden,
                 max_position_embeddings=max_context)
    return LongContextFiles(train_path, test_path, sft_path, policy)
