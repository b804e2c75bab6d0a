"""One RL sample from rollout to loss, as one typed record.

The TransferQueue stores samples by field, so that a worker starts on a sample as soon as
the fields it reads are written (per-field readiness, AsyncFlow's design). `Sample` names
those fields, and every worker reads and writes them through it:

    field        written by            read by
    prompt       rollout               reward, reference, learner
    response     rollout               reward, reference, learner
    behav_logp   rollout               learner (the importance weight of a stale sample)
    version      rollout               learner (staleness; the weights it was sampled with)
    group        rollout               reference (one forward per group), learner (GRPO groups; each trained once)
    written_at   rollout               learner (queue latency)
    reward       reward worker         learner (None: the reward function raised)
    ref_logp     reference worker      learner (the KL term)
    adv          learner (GRPO)        the policy loss (rl/grpo.py)

A worker that reads only some fields gets a `Sample` with the others None.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Mapping, Sequence

from .task_protocol import Prompt


@dataclass
class Sample:
    prompt: Prompt
    response: list[int]
    behav_logp: list[float] | None = None  # per response token, under the distribution it was sampled from
    version: int | None = None  # the policy version that generated it
    group: int | None = None
    written_at: float | None = None  # time.time() of the rollout's write
    reward: float | None = None
    ref_logp: list[float] | None = None  # per response token, under the reference policy
    adv: float | None = None  # the GRPO group advantage (the learner computes it; never queued)

    @property
    def length(self) -> int:
        """Tokens the learner trains on: prompt + response."""
        return len(self.prompt.tokens) + len(self.response)


ROLLOUT_FIELDS = ("prompt", "response", "behav_logp", "version", "group", "written_at")
QUEUED_FIELDS = ROLLOUT_FIELDS + ("reward", "ref_logp")  # what the learner reads of each sample
_NAMES = {f.name for f in fields(Sample)}


def to_columns(samples: Sequence[Sample], names: Sequence[str] = ROLLOUT_FIELDS) -> dict[str, list]:
    """The queue's form of `samples`: one list per field."""
    return {k: [getattr(s, k) for s in samples] for k in names}


def from_columns(data: Mapping[str, list]) -> list[Sample]:
    """Samples from the queue's columns (the fields a worker asked for; the others None)."""
    unknown = set(data) - _NAMES
    if unknown:
        raise KeyError(f"not fields of a Sample: {sorted(unknown)}")
    n = len(next(iter(data.values()))) if data else 0
    return [Sample(**{k: v[i] for k, v in data.items()}) for i in range(n)]
