"""The built-in verifiable task: copy a digit string.

    prompt    BOS d1 d2 ... dn SEP
    response  d1 d2 ... dn EOS          reward 1 for an exact match, else 0

The policy decides the response length (it stops by emitting EOS), and n is heavy-tailed:
a lognormal body with a Pareto tail, capped at `max_digits`, so a batch's generation time
is set by its few longest samples, as in real RL post-training. `sft_batch` gives
supervised examples for the warm start (as post-training starts from a pretrained model).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

DIGITS = 10
BOS, SEP, EOS = 10, 11, 12
VOCAB = 13  # the model's vocab_size must be at least this


@dataclass(frozen=True)
class Prompt:
    uid: int
    digits: tuple[int, ...]

    @property
    def tokens(self) -> list[int]:
        return [BOS, *self.digits, SEP]

    @property
    def answer(self) -> list[int]:
        return [*self.digits, EOS]


class CopyTask:
    def __init__(self, min_digits: int, max_digits: int, median_digits: float, sigma: float, tail_start: int,
                 tail_alpha: float, tail_share: float, seed: int):
        if not 1 <= min_digits <= max_digits:
            raise ValueError(f"task: need 1 <= min_digits ({min_digits}) <= max_digits ({max_digits})")
        self.min, self.max = min_digits, max_digits
        self.median, self.sigma = median_digits, sigma
        self.tail_start, self.alpha, self.tail_share = tail_start, tail_alpha, tail_share
        self.rng = np.random.default_rng(seed)
        self.next_uid = 0

    @classmethod
    def from_spec(cls, spec, seed: int) -> "CopyTask":
        return cls(spec.min_digits, spec.max_digits, spec.median_digits, spec.sigma, spec.tail_start,
                   spec.tail_alpha, spec.tail_share, seed)

    def length(self) -> int:
        if self.rng.random() < self.tail_share:  # Pareto tail above tail_start
            n = self.tail_start * (1.0 - self.rng.random()) ** (-1.0 / self.alpha)
        else:
            n = math.exp(math.log(self.median) + self.sigma * self.rng.standard_normal())
        return int(min(self.max, max(self.min, round(n))))

    def prompts(self, n: int) -> list[Prompt]:
        out = []
        for _ in range(n):
            digits = tuple(int(d) for d in self.rng.integers(0, DIGITS, self.length()))
            out.append(Prompt(self.next_uid, digits))
            self.next_uid += 1
        return out

    def max_response(self) -> int:
        return self.max + 1

    def max_prompt(self) -> int:
        return self.max + 2


def reward(prompt: Prompt, response: list[int]) -> float:
    """Exact match of the response (stop token included) with the digits."""
    return 1.0 if list(response) == prompt.answer else 0.0


def sft_batch(task: CopyTask, n: int) -> tuple[list[torch.Tensor], list[int]]:
    """n supervised sequences (prompt + answer) and each one's prompt length."""
    seqs, prompt_lens = [], []
    for p in task.prompts(n):
        seqs.append(torch.tensor(p.tokens + p.answer))
        prompt_lens.append(len(p.tokens))
    return seqs, prompt_lens
