"""Config sections of an RL job (`pliant rl --config configs/rl-local.yaml`): the task, the
algorithm and dataflow (`rl`), the learner group's engine (`learner`) and the Ray resources
of each worker. The model section is the runtime's ModelSpec; `pliant.config.RLJobConfig`
composes them."""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, \
    PositiveInt, TypeAdapter, ValidationInfo, ValidatorFunctionWrapHandler, WrapValidator, field_validator, \
    model_validator

from pliant.planner.errors import InputError
from pliant.planner.spec import BandwidthSpec, CostSpec, PlannerSpec


class RLConfigError(InputError):
    """An RL job that cannot run as configured (the command line reports it as an error)."""


class RLResourceError(RLConfigError):
    """The workers ask for more CPUs or GPUs than the Ray cluster has."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class CopyTaskSpec(_Strict):
    """The built-in copy task (rl/task.py); digit counts: lognormal body, Pareto tail. It
    needs pliant's own model (token ids 0..12)."""

    kind: Literal["copy"] = "copy"
    min_digits: PositiveInt = 1
    max_digits: PositiveInt = 40
    median_digits: PositiveFloat = 4.0
    sigma: PositiveFloat = 0.5
    tail_start: PositiveInt = 8
    tail_alpha: PositiveFloat = 1.2
    tail_share: float = 0.15

    @model_validator(mode="after")
    def _consistent(self) -> "CopyTaskSpec":
        if self.min_digits > self.max_digits:
            raise ValueError(f"min_digits={self.min_digits} is above max_digits={self.max_digits}")
        if not 0.0 <= self.tail_share <= 1.0:
            raise ValueError(f"tail_share={self.tail_share} must be within [0, 1]")
        return self


# what rl/prompts.py reads (runtime/corpus.py's formats): JSON lines, optionally compressed, or Parquet
DATASET_SUFFIXES = tuple(f"{j}{c}" for j in (".jsonl", ".json", ".ndjson") for c in ("", ".gz", ".bz2", ".zst")) \
    + (".parquet",)


class DatasetTaskSpec(_Strict):
    """Prompts from a dataset file (rl/prompts.py), one row per prompt, scored by rl.reward_fn.

    The tokenizer is the model directory's (model.hf_path) unless `tokenizer` names another;
    `chat_template` wraps each prompt as a user message (after `system_prompt`, if any) with
    the tokenizer's chat template. A prompt whose tokens plus max_response_tokens exceed the
    policy's context (max_context_tokens, else the model directory's max_position_embeddings)
    is skipped and counted, or with `overlong: error` stops the run naming its row."""

    kind: Literal["dataset"]
    dataset: str  # JSONL (.jsonl, .jsonl.gz) or Parquet
    eval_dataset: str | None = None  # held-out prompts; null: a seeded split of `dataset`, kept out of training
    # the supervised warm start's rows (prompt and answer keys as `dataset`); null: `dataset`'s own
    sft_dataset: str | None = None
    prompt_key: str = "prompt"
    answer_key: str | None = "answer"  # the reference answer for the supervised warm start; null: none
    tokenizer: str | None = None  # a tokenizer directory; null: model.hf_path
    chat_template: bool = False
    system_prompt: str | None = None  # with chat_template: a system message before each prompt
    max_response_tokens: PositiveInt = 64  # tokens generated at most, the stop token included
    overlong: Literal["skip", "error"] = "skip"
    max_context_tokens: PositiveInt | None = None  # the policy's context; null: the model directory's

    @field_validator("dataset", "eval_dataset", "sft_dataset")
    @classmethod
    def _readable_format(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not value.lower().endswith(DATASET_SUFFIXES):
            raise ValueError(f"{info.field_name}={value!r} is not a dataset file pliant reads: JSON lines (.jsonl, "
                             f".json, .ndjson; optionally .gz, .bz2, .zst) or Parquet (.parquet)")
        return value

    @field_validator("prompt_key", "answer_key")
    @classmethod
    def _non_empty_key(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not value:
            raise ValueError(f"{info.field_name} must name a key of the dataset's rows, got an empty string")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "DatasetTaskSpec":
        if self.answer_key is not None and self.answer_key == self.prompt_key:
            raise ValueError(f"answer_key={self.answer_key!r} is the prompt_key too; the answer needs its own key "
                             f"(or answer_key: null for none)")
        if self.system_prompt is not None and not self.chat_template:
            raise ValueError("system_prompt is set but chat_template is false; the system prompt is a message of "
                             "the chat template (set chat_template: true, or put the text in the prompts)")
        if self.max_context_tokens is not None and self.max_response_tokens >= self.max_context_tokens:
            raise ValueError(f"max_response_tokens={self.max_response_tokens} leaves no room for a prompt in "
                             f"max_context_tokens={self.max_context_tokens}")
        return self


TASK_KINDS: dict[str, type[_Strict]] = {"copy": CopyTaskSpec, "dataset": DatasetTaskSpec}


def _task_by_kind(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """The section's class by its `kind` (absent: copy, so configs written before the dataset
    task still parse). Errors keep the section's own keys in their location (task.dataset),
    without the tag a discriminated union would add (task.dataset.dataset)."""
    if isinstance(value, tuple(TASK_KINDS.values())):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"the task section must be a mapping (kind: {' or '.join(TASK_KINDS)} and its keys), "
                         f"got {type(value).__name__}")
    kind = value.get("kind", "copy")
    if kind not in TASK_KINDS:
        raise ValueError(f"kind={kind!r} is not a task kind; choose {' or '.join(map(repr, TASK_KINDS))} "
                         f"(absent: copy)")
    return TASK_KINDS[kind].model_validate(value)


# the task section, by `kind`: a CopyTaskSpec (the default) or a DatasetTaskSpec
TaskSpec = Annotated[Union[CopyTaskSpec, DatasetTaskSpec], WrapValidator(_task_by_kind)]
_TASK_ADAPTER: TypeAdapter = TypeAdapter(TaskSpec)


def task_spec(**fields: Any) -> CopyTaskSpec | DatasetTaskSpec:
    """The task section's spec from its keys, as a config file gives them (no kind: copy)."""
    return _TASK_ADAPTER.validate_python(fields)


class RLSpec(_Strict):
    mode: Literal["sync", "async"] = "async"
    staleness: NonNegativeInt = 1  # async: no sample is trained more than this many versions after its policy
    steps: PositiveInt = 40  # optimizer steps (policy versions) to train
    prompts_per_step: PositiveInt = 8
    group_size: PositiveInt = 4  # responses per prompt (GRPO group)
    # at most this many groups per learner micro-batch (async takes whatever whole groups are ready, up
    # to it); the planner places each micro-batch's samples into SP groups of the learner's ranks
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
    # module:function or path/to/file.py:function, called as fn(sample: pliant.rl.reward.RewardSample) -> float
    reward_fn: str = "pliant.rl.task:reward"
    # "builtin" (pliant's decoder) or a module:function factory of a rollout engine (rl/rollout_engine.py)
    rollout_engine: str = "builtin"
    eval_prompts: NonNegativeInt = 256  # held-out prompts scored before and after RL (0: none)
    queue_capacity: PositiveInt | None = None  # default: (staleness + 2) x the step's samples
    storage_units: PositiveInt = 2  # TransferQueue storage actors (samples sharded over them)
    stall_timeout_s: PositiveFloat = 300.0  # no step trained for this long: the run stops with its state
    seed: NonNegativeInt = 0
    # the learner's checkpoint (RUN/checkpoints/step-N, what `pliant export --run-dir RUN` reads)
    # every this many steps, and always after the last (0, or more than the run's steps: after
    # the last only)
    checkpoint_every: NonNegativeInt = 0
    keep_checkpoints: PositiveInt = 2  # complete checkpoints kept (older ones are removed)

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


class LearnerResources(ActorResources):
    """Each of the learner's `world` ranks (one Ray actor each, placed together)."""

    world: PositiveInt = 1

    @model_validator(mode="after")
    def _whole_gpus(self) -> "LearnerResources":
        if self.num_gpus and self.num_gpus != 1:
            raise ValueError(f"num_gpus={self.num_gpus:g}: a learner rank drives one whole GPU (give 1, or 0 for CPU)")
        return self


class LearnerSpec(_Strict):
    """The learner group as the runtime's engine sees it (the sections of a `pliant train` job,
    for resources.learner.world ranks): how micro-batches are planned into SP groups, and the
    cluster facts and cost coefficients the planner prices plans with."""

    # adaptive: the planner's SP groups of mixed sizes per micro-batch; static: every group of
    # static_degree (null: the smallest degree that holds the task's longest sample) for the whole
    # run; uniform: every group of the smallest degree that holds the micro-batch's longest sample,
    # chosen per micro-batch (verl's and Megatron's dynamic context parallelism); dp: groups of one
    plan: Literal["adaptive", "static", "uniform", "dp"] = "adaptive"
    static_degree: PositiveInt | None = None  # plan: static
    devices_per_node: PositiveInt | None = Field(
        default=None, description="learner ranks per node, for the bandwidth table (default: all on one node)")
    device_memory_gib: PositiveFloat
    bandwidth: BandwidthSpec
    cores: PositiveInt | None = None  # CPU learners sharing fewer cores than ranks (see ClusterSpec.cores)
    cost: CostSpec
    planner: PlannerSpec = PlannerSpec()

    @model_validator(mode="after")
    def _consistent(self) -> "LearnerSpec":
        if self.static_degree is not None and self.plan != "static":
            raise ValueError(f"static_degree={self.static_degree} is set but plan is {self.plan!r}; it is the group "
                             f"size of plan: static")
        return self


class ResourcesSpec(_Strict):
    """Ray resources per worker; `ray_address` null starts a local cluster of `num_cpus`
    (null: the machine's), "auto" joins a running one (as under `ray job submit`)."""

    ray_address: str | None = None
    num_cpus: PositiveInt | None = None
    rollout_workers: PositiveInt = 1
    rollout: ActorResources = ActorResources()
    learner: LearnerResources = LearnerResources()
    reference: ActorResources = ActorResources(num_cpus=0.0)
    reward: ActorResources = ActorResources(num_cpus=0.0)
