"""Config sections the runtime reads: training and data. Composed into the job config by
pliant.config; tuning knobs have defaults, paths and sizes are validated."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DataSpec(_Strict):
    """Where documents come from. `synthetic`: the built-in learnable task with lengths from
    a named distribution (`dist`) or a length file (`lengths_file`), divided by
    `length_divisor` so realistic shapes fit a CPU; `tokens`: a Megatron indexed dataset
    (PREFIX.bin + PREFIX.idx, e.g. written by `pliant data prepare` or Megatron's tools)."""

    source: Literal["synthetic", "tokens"] = "synthetic"
    dist: str | None = "wikipedia-synth"
    lengths_file: str | None = None
    length_divisor: PositiveInt = 1
    documents: PositiveInt = 20000
    token_prefix: str | None = None
    seed: NonNegativeInt = 0

    @model_validator(mode="after")
    def _consistent(self) -> "DataSpec":
        if self.source == "tokens" and not self.token_prefix:
            raise ValueError("source 'tokens' needs token_prefix (PREFIX of PREFIX.bin and PREFIX.idx)")
        if self.source == "synthetic" and self.lengths_file and self.dist:
            raise ValueError("give either dist or lengths_file for synthetic data, not both (set dist: null)")
        return self


class TrainSpec(_Strict):
    steps: PositiveInt = 200
    batch_tokens: PositiveInt = 8192
    max_len: PositiveInt | None = 4096
    # adaptive: groups of any sizes per batch; static: every group of static_degree; dp: no SP;
    # batchada: one uniform degree per batch, the one the cost model prices fastest (a baseline)
    plan: Literal["adaptive", "static", "dp", "batchada"] = "adaptive"
    static_degree: PositiveInt | None = None  # for plan: static; default: the smallest that holds max_len
    lr: PositiveFloat = 3e-3
    min_lr: NonNegativeFloat = 3e-4
    warmup_steps: NonNegativeInt = 20
    weight_decay: NonNegativeFloat = 0.01
    adam_eps: PositiveFloat = 1e-8
    betas: tuple[float, float] = Field(default=(0.9, 0.95), strict=False)  # YAML gives a list
    grad_clip: PositiveFloat | None = 1.0
    seed: NonNegativeInt = 0
    checkpoint_every: PositiveInt = 50
    keep_checkpoints: PositiveInt = 3
    tensorboard: bool = Field(default=False, description="also write metrics as TensorBoard event files in "
                                                         "RUN_DIR/tensorboard")

    @model_validator(mode="after")
    def _consistent(self) -> "TrainSpec":
        if self.max_len is not None and self.max_len > self.batch_tokens:
            raise ValueError(f"max_len={self.max_len} exceeds batch_tokens={self.batch_tokens}: a single document "
                             f"could not fit a batch")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} is above lr={self.lr}")
        return self
