"""What an RL task is, apart from any one task: the `Task` protocol the runner draws prompts
through, the `Prompt` it hands out, and the seeds of its fixed streams. The copy task
(rl/task.py) and prompt datasets (rl/prompts.py) both implement it; rl/task.py's `build_task`
picks one by the config's `task.kind`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from .reward import RewardSample

EVAL_SEED = 99_991  # the held-out prompts: one set for every mode and seed
SFT_SEED_OFFSET = 10_000  # the supervised examples' stream: seed + this


@dataclass(frozen=True, slots=True)
class Prompt:
    """One prompt as it travels through the RL queue (written into it for every sample)."""

    uid: int  # unique in the run, in hand-out order (held-out prompts: -1, -2, ...)
    tokens: tuple[int, ...]  # prompt ids as the policy reads them (chat template applied when configured)
    answer: tuple[int, ...] = ()  # reference answer ids + a stop token, for the supervised warm start; () when none
    text: str = ""  # the prompt text (the row's prompt_key value, before any template)
    row: dict = field(default_factory=dict, hash=False)  # the dataset row as read (copy task: {"digits": "0412"})


@dataclass(frozen=True)
class LearnerCapacity:
    """The longest sample (prompt + response tokens) the learner's memory holds: in its
    largest SP group (`ranks` ranks of `memory_gib` each)."""

    tokens: int
    ranks: int
    memory_gib: float

    def describe(self) -> str:
        return (f"the learner's largest SP group ({self.ranks} rank(s) of learner.device_memory_gib="
                f"{self.memory_gib:g}) holds a sample of {self.tokens} tokens")


@runtime_checkable
class Task(Protocol):
    """What the RL runner needs of a task. The object pickles small (it is sent to Ray actors)
    and its three streams are independent: drawing from one never changes another."""

    stop_tokens: tuple[int, ...]  # generation stops at any of them; stop_tokens[0] ends SFT answers

    def prompts(self, n: int) -> list[Prompt]:
        """The next n training prompts (uids keep counting up)."""

    def held_out(self, n: int) -> list[Prompt]:
        """The first n fixed evaluation prompts (the same ones on every call, every seed)."""

    def sft_examples(self, n: int) -> list[Prompt]:
        """The next n prompts with answers, for the supervised warm start."""

    def max_prompt(self) -> int:
        """The longest prompt (tokens) any stream hands out."""

    def max_response(self) -> int:
        """Response tokens to generate at most, the stop token included."""

    def decode(self, ids: list[int]) -> str:
        """The response's text, stop and special tokens dropped."""

    def reward_sample(self, prompt: Prompt, response_ids: list[int]) -> RewardSample:
        """What the reward function scores."""

    def counts(self) -> dict:
        """Counters worth reporting (prompts handed out, rows skipped, ...)."""
