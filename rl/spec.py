"""Config sections of an RL job (`pliant rl --config configs/rl-local.yaml`): the task, the
algorithm and dataflow (`rl`), and the Ray resources of each worker. The model section is
the runtime's ModelSpec; `launch.config.RLJobConfig` composes them."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, \
    model_validator


class RLConfigError(ValueError):
    """An RL job that cannot run as configured (the command line reports it as an error)."""


class RLResourceError(RLConfigError):
    """The workers ask for more CPUs or GPUs than the Ray cluster has."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class TaskSpec(_Strict):
    """The copy task (rl/task.py); digit counts: lognormal body, Pareto tail."""

    kind: Literal["copy"] = "copy"
    min_digits: PositiveInt = 1
    max_digits: PositiveInt = 40
    median_digits: PositiveFloat = 4.0
    sigma: PositiveFloat = 0.5
    tail_start: PositiveInt = 8
    tail_alpha: PositiveFloat = 1.2
    tail_share: float = 0.15

    @model_validator(mode="after")
    def _consistent(self) -> "TaskSpec":
        if self.min_digits > self.max_digits:
            raise ValueError(f"min_digits={self.min_digits} is above max_digits={self.max_digits}")
        if not 0.0 <= self.tail_share <= 1.0:
            raise ValueError(f"tail_share={self.tail_share} must be within [0, 1]")
        return self


class RLSpec(_Strict):
    mode: Literal["sync", "async"] = "async"
    staleness: NonNegativeInt = 1  # async: no sample is trained more than this many versions after its policy
    steps: PositiveInt = 40  # optimizer steps (policy versions) to train
    prompts_per_step: PositiveInt = 8
    group_size: PositiveInt = 4  # responses per prompt (GRPO group)
    # at most this many groups per trainer forward (async takes whatever whole groups are ready, up to it)
    micro_batch_groups: PositiveInt = 2
    rollout_slots: PositiveInt = 16  # sequences a rollout worker decodes together
    # the reference and reward workers take up to score_batch_groups groups per queue call,
    # waiting up to score_linger_s for them once one is ready while more of the oldest step
    # is on its way (fewer calls per sample: each costs about a millisecond of CPU on each
    # side; 0: take what is ready)
    score_batch_groups: PositiveInt = 4
    score_linger_s: NonNegativeFloat = 0.1
    temperature: PositiveFloat = 1.0
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 0.0
    grad_clip: PositiveFloat | None = 1.0
    clip_eps: PositiveFloat = 0.2
    kl_coef: NonNegativeFloat = 0.01
    is_cap: PositiveFloat = 2.0  # truncation of the importance weight for stale samples
    sft_steps: NonNegativeInt = 300  # supervised warm start before RL
    sft_batch: PositiveInt = 16
    sft_lr: PositiveFloat = 3e-3
    sft_warmup_steps: NonNegativeInt = 40  # linear warm-up of the supervised lr (grad_clip applies too)
    reward_fn: str = "pliant.rl.task:reward"  # module:function(prompt, response) -> float
    eval_prompts: NonNegativeInt = 256  # held-out prompts scored before and after RL (0: none)
    queue_capacity: PositiveInt | None = None  # default: (staleness + 2) x the step's samples
    storage_units: PositiveInt = 2  # TransferQueue storage actors (samples sharded over them)
    stall_timeout_s: PositiveFloat = 300.0  # no step trained for this long: the run stops with its state
    seed: NonNegativeInt = 0

    @property
    def samples_per_step(self) -> int:
        return self.prompts_per_step * self.group_size

    @model_validator(mode="after")
    def _consistent(self) -> "RLSpec":
        if self.micro_batch_groups > self.prompts_per_step:
            raise ValueError(f"micro_batch_groups={self.micro_batch_groups} exceeds prompts_per_step="
                             f"{self.prompts_per_step}")
        if self.rollout_slots < self.group_size:
            raise ValueError(f"rollout_slots={self.rollout_slots} cannot hold a group of {self.group_size}")
        if self.queue_capacity is not None and self.queue_capacity < self.samples_per_step:
            raise ValueError(f"queue_capacity={self.queue_capacity} is below one step's samples "
                             f"({self.samples_per_step})")
        return self


class ActorResources(_Strict):
    num_cpus: NonNegativeFloat = 1.0
    num_gpus: NonNegativeFloat = 0.0
    threads: PositiveInt = 1  # torch intra-op threads, pinned


class ResourcesSpec(_Strict):
    """Ray resources per worker; `ray_address` null starts a local cluster of `num_cpus`
    (null: the machine's), "auto" joins a running one (as under `ray job submit`)."""

    ray_address: str | None = None
    num_cpus: PositiveInt | None = None
    rollout_workers: PositiveInt = 1
    rollout: ActorResources = ActorResources()
    trainer: ActorResources = ActorResources()
    reference: ActorResources = ActorResources(num_cpus=0.0)
    reward: ActorResources = ActorResources(num_cpus=0.0)
