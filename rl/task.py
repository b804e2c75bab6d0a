"""RL tasks: where prompts come from and how a response is scored.

Every task implements the `Task` protocol (rl/task_protocol.py): three independent seeded
streams (training prompts, fixed held-out prompts, supervised examples for the warm start),
the lengths the rollout needs, the stop tokens, and `reward_sample`, which turns a response
into the `RewardSample` a reward function (rl/reward.py) scores. `build_task` makes the task of a
config's `task` section:

    kind: copy      the built-in copy task (this file), on pliant's own model
    kind: dataset   prompts from a JSONL / Parquet file (rl/prompts.py), any tokenizer

The copy task:

    prompt    BOS d1 d2 ... dn SEP
    response  d1 d2 ... dn EOS          reward 1 for an exact match, else 0

The policy decides the response length (it stops by emitting EOS), and n is heavy-tailed:
a lognormal body with a Pareto tail, capped at `max_digits`, so a batch's generation time
is set by its few longest samples, as in real RL post-training.
"""
from __future__ import annotations

import math

import numpy as np

from .reward import RewardSample
from .spec import RLConfigError
from .task_protocol import EVAL_SEED, SFT_SEED_OFFSET, LearnerCapacity, Prompt, Task

DIGITS = 10
BOS, SEP, EOS = 10, 11, 12
VOCAB = 13  # the model's vocab_size must be at least this


class _CopyStream:
    """One seeded stream of copy prompts (the draws of the original CopyTask, unchanged)."""

    def __init__(self, task: "CopyTask", seed: int, first_uid: int = 0, uid_step: int = 1):
        self.task, self.rng = task, np.random.default_rng(seed)
        self.next_uid, self.uid_step = first_uid, uid_step

    def length(self) -> int:
        t = self.task
        if self.rng.random() < t.tail_share:  # Pareto tail above tail_start
            n = t.tail_start * (1.0 - self.rng.random()) ** (-1.0 / t.alpha)
        else:
            n = math.exp(math.log(t.median) + t.sigma * self.rng.standard_normal())
        return int(min(t.max, max(t.min, round(n))))

    def take(self, n: int) -> list[Prompt]:
        out = []
        for _ in range(n):
            digits = tuple(int(d) for d in self.rng.integers(0, DIGITS, self.length()))
            out.append(copy_prompt(self.next_uid, digits))
            self.next_uid += self.uid_step
        return out


def copy_prompt(uid: int, digits: tuple[int, ...]) -> Prompt:
    text = "".join(map(str, digits))
    return Prompt(uid, (BOS, *digits, SEP), (*digits, EOS), text, {"digits": text})


class CopyTask:
    """The copy task's three streams: training prompts from `seed`, supervised examples from
    seed + 10000, held-out prompts from EVAL_SEED (the streams of the runner before tasks
    were pluggable, so a seed draws the same prompts as it did)."""

    stop_tokens = (EOS,)

    def __init__(self, min_digits: int, max_digits: int, median_digits: float, sigma: float, tail_start: int,
                 tail_alpha: float, tail_share: float, seed: int):
        if not 1 <= min_digits <= max_digits:
            raise ValueError(f"task: need 1 <= min_digits ({min_digits}) <= max_digits ({max_digits})")
        self.min, self.max = min_digits, max_digits
        self.median, self.sigma = median_digits, sigma
        self.tail_start, self.alpha, self.tail_share = tail_start, tail_alpha, tail_share
        self.seed = seed
        self._train = _CopyStream(self, seed)
        self._sft = _CopyStream(self, seed + SFT_SEED_OFFSET)

    @classmethod
    def from_spec(cls, spec, seed: int) -> "CopyTask":
        return cls(spec.min_digits, spec.max_digits, spec.median_digits, spec.sigma, spec.tail_start,
                   spec.tail_alpha, spec.tail_share, seed)

    @property
    def next_uid(self) -> int:
        return self._train.next_uid

    def prompts(self, n: int) -> list[Prompt]:
        return self._train.take(n)

    def held_out(self, n: int) -> list[Prompt]:
        return _CopyStream(self, EVAL_SEED, first_uid=-1, uid_step=-1).take(n)

    def sft_examples(self, n: int) -> list[Prompt]:
        return self._sft.take(n)

    def max_response(self) -> int:
        return self.max + 1

    def max_prompt(self) -> int:
        return self.max + 2

    def decode(self, ids: list[int]) -> str:
        out = []
        for t in ids:
            if t == EOS:
                break
            if 0 <= t < DIGITS:
                out.append(str(t))
        return "".join(out)

    def reward_sample(self, prompt: Prompt, response_ids: list[int]) -> RewardSample:
        return RewardSample(prompt.text, self.decode(response_ids), list(response_ids), prompt.row,
                            list(prompt.tokens))

    def counts(self) -> dict:
        return {"prompts": self._train.next_uid, "sft_examples": self._sft.next_uid}


def reward(sample: RewardSample) -> float:
    """The copy task's reward: 1 for an exact match of the response ids (stop token included)
    with the prompt's digits, else 0."""
    return 1.0 if list(sample.response_ids) == [*map(int, sample.row["digits"]), EOS] else 0.0


def build_task(task_spec, model_spec, seed: int, eval_prompts: int, learner: "LearnerCapacity | None" = None) -> Task:
    """The task of a config's `task` section for a policy `model_spec` (planner ModelSpec);
    `eval_prompts`: how many held-out prompts the run evaluates on (a dataset without an
    eval_dataset keeps that many of its rows out of training); `learner`: the longest sample
    the learner's memory holds (rl/learner.py `learner_capacity`), a second limit beside the
    policy's context (a dataset's prompts beyond it are skipped and counted, or an error, as
    task.overlong says; the copy task's longest sample must fit it)."""
    if task_spec.kind == "copy":
        if model_spec.hf_path is not None:
            raise RLConfigError(f"task.kind=copy needs pliant's own model (its token ids 0..{VOCAB - 1} are digits "
                                f"and markers), but model.hf_path={model_spec.hf_path!r} is a Hugging Face model; "
                                f"give it prompts with task.kind: dataset")
        if model_spec.vocab_size < VOCAB:
            raise RLConfigError(f"model.vocab_size={model_spec.vocab_size}: the copy task needs at least {VOCAB}")
        task = CopyTask.from_spec(task_spec, seed)
        if learner is not None and task.max_prompt() + task.max_response() > learner.tokens:
            raise RLConfigError(f"task.max_digits={task_spec.max_digits}: the longest copy sample is "
                                f"{task.max_prompt() + task.max_response()} tokens, above what the learner holds: "
                                f"{learner.describe()}")
        return task
    if task_spec.kind == "dataset":
        from .prompts import DatasetTask

        return DatasetTask(task_spec, model_spec, seed, eval_prompts, learner)
    raise RLConfigError(f"task.kind={task_spec.kind!r} is not a task kind")


def sft_batch(task: Task, n: int) -> tuple[list, list[int]]:
    """n supervised sequences (prompt + answer, torch tensors) and each one's prompt length,
    from the task's supervised stream."""
    import torch

    seqs, prompt_lens = [], []
    for p in task.sft_examples(n):
        if not p.answer:
            raise RLConfigError("the task has no reference answers (task.answer_key is null): set rl.sft_steps: 0 "
                                "or give the dataset an answer column")
        seqs.append(torch.tensor([*p.tokens, *p.answer]))
        prompt_lens.append(len(p.tokens))
    return seqs, prompt_lens
