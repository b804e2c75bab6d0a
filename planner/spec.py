"""Config sections the planner reads: cluster, model, cost coefficients, planner options.

These are pydantic models so that a YAML file is validated with messages that name the
key, the value and what is allowed. `pliant.config` composes them (and the
sections later layers own) into the whole job config; the planner only needs these.

Cluster facts (sizes, memory, bandwidth) and cost coefficients have no defaults: a
planner that silently assumed an 80 GiB device would plan for a machine that is not there.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, NonNegativeFloat, NonNegativeInt, model_validator

GIB = 1024**3
DTYPE_BYTES = {"fp64": 8, "fp32": 4, "bf16": 2, "fp16": 2}
AttentionKind = Literal["softmax", "linear"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class BandwidthSpec(_Strict):
    """Collective bandwidth seen by one device, in GB/s (1e9 bytes/s).

    Either a table by SP group size (measured, FlexSP style) or an intra-node and an
    inter-node figure. A group size missing from the table uses the entry of the next
    larger size present (a conservative step).
    """

    all_to_all_gbps: dict[PositiveInt, PositiveFloat] | None = None
    all_gather_gbps: dict[PositiveInt, PositiveFloat] | None = Field(
        default=None, description="LASP-2 state AllGather; the all-to-all figures are used when absent"
    )
    intra_node_gbps: PositiveFloat | None = None
    inter_node_gbps: PositiveFloat | None = None

    @model_validator(mode="after")
    def _one_form(self) -> "BandwidthSpec":
        has_table = self.all_to_all_gbps is not None
        has_pair = self.intra_node_gbps is not None or self.inter_node_gbps is not None
        if has_table and has_pair:
            raise ValueError("give either all_to_all_gbps or intra_node_gbps/inter_node_gbps, not both")
        if not has_table and not has_pair:
            raise ValueError("missing: all_to_all_gbps (GB/s by group size) or intra_node_gbps and inter_node_gbps")
        if has_pair and (self.intra_node_gbps is None or self.inter_node_gbps is None):
            raise ValueError("intra_node_gbps and inter_node_gbps must be given together")
        if has_table and not self.all_to_all_gbps:
            raise ValueError("all_to_all_gbps is empty")
        for name in ("all_to_all_gbps", "all_gather_gbps"):
            table = getattr(self, name)
            if table is not None and any(k < 2 for k in table):
                raise ValueError(f"{name}: group sizes must be >= 2 (a group of 1 moves nothing), got {sorted(table)}")
        return self


class ClusterSpec(_Strict):
    name: str
    nodes: PositiveInt
    devices_per_node: PositiveInt
    device: Literal["cuda", "cpu"]
    backend: Literal["nccl", "gloo"]
    device_memory_gib: PositiveFloat
    bandwidth: BandwidthSpec
    hosts: list[str] | None = Field(default=None, description="one address per node, first is the rendezvous host")
    port: int = Field(default=29500, ge=1, le=65535, description="rendezvous port on the first host")
    rendezvous_timeout_s: PositiveFloat = Field(
        default=600.0, description="multi-node jobs: how long a node waits for the others (torchrun's c10d "
                                   "join_timeout, and the fault monitor master's answer) before it fails")
    cores: PositiveInt | None = Field(
        default=None,
        description="CPU cores the ranks of a node share, when fewer than devices_per_node: a rank then runs "
                    "faster while others idle, and plans are priced for that; None for dedicated devices")
    spare_devices_per_node: NonNegativeInt = Field(
        default=0, description="healthy devices per node kept out of the world: a restart after a fault replaces a "
                               "bad device with one of them before it shrinks the world")

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node

    @model_validator(mode="after")
    def _consistent(self) -> "ClusterSpec":
        if self.hosts is not None and len(self.hosts) != self.nodes:
            raise ValueError(f"hosts lists {len(self.hosts)} addresses for nodes={self.nodes}")
        if self.device == "cpu" and self.backend == "nccl":
            raise ValueError("backend 'nccl' needs device 'cuda'; use backend 'gloo' for device 'cpu'")
        if self.cores is not None and self.device != "cpu":
            raise ValueError("cores (shared CPU cores) applies to device 'cpu' only")
        for name in ("all_to_all_gbps", "all_gather_gbps"):
            table = getattr(self.bandwidth, name)
            if table is None:
                continue
            too_big = [k for k in table if k > self.world_size]
            if too_big:
                raise ValueError(
                    f"bandwidth.{name}: group sizes {too_big} exceed the cluster's "
                    f"{self.world_size} devices ({self.nodes} nodes x {self.devices_per_node})"
                )
            if self.world_size > 1 and max(table) < self.world_size:
                raise ValueError(
                    f"bandwidth.{name}: no entry for group sizes above {max(table)}, but the cluster has "
                    f"{self.world_size} devices; add an entry for {self.world_size}"
                )
        return self


class ModelSpec(_Strict):
    """Model shape as the cost model sees it (the runtime builds the model from the same section).

    With `hf_path` (a local Hugging Face model directory) the shape comes from its config.json
    and the parameter count from its safetensors files: nobody types them twice, and a value
    the job config also gives must agree with the directory's (planner/model_dir.py).
    """

    name: str
    hf_path: str | None = Field(default=None, description="local Hugging Face model directory (config.json, "
                                                           "*.safetensors, tokenizer files); nothing is downloaded")
    layers: PositiveInt
    hidden: PositiveInt
    heads: PositiveInt
    kv_heads: PositiveInt
    head_dim: PositiveInt
    ffn_hidden: PositiveInt
    vocab_size: PositiveInt
    params: PositiveFloat | None = Field(default=None, description="parameter count; computed from the shape when absent")
    attention: list[AttentionKind] = Field(
        min_length=1, description="layer pattern, repeated over the layers, e.g. [linear, linear, linear, softmax]"
    )
    linear_decay: bool = True
    linear_sp: Literal["auto", "lasp2", "ring", "heads"] = Field(
        default="auto", description="SP method of linear-attention layers: LASP-2 (one AllGather of states or, for "
                                    "the gated delta rule, of chunk maps), the LASP-1 ring (point-to-point hops), "
                                    "the head all-to-all (Gated DeltaNet only, as Megatron does; groups whose size "
                                    "does not divide the value heads run LASP-2) or auto: LASP-2, "
                                    "and for Gated DeltaNet the cheaper of LASP-2 and the head all-to-all per group")
    linear_kind: Literal["linear", "gated_delta"] = Field(
        default="linear", description="the linear layers' recurrence: pliant's linear attention, or the gated "
                                      "delta rule of Gated DeltaNet layers (Qwen3.5, Qwen3-Next; set from hf_path)")
    linear_heads: PositiveInt | None = Field(default=None, description="linear layers' value heads (default heads)")
    linear_key_heads: PositiveInt | None = Field(default=None, description="their key heads (default linear_heads)")
    linear_key_dim: PositiveInt | None = Field(default=None, description="key head dim (default head_dim)")
    linear_value_dim: PositiveInt | None = Field(default=None, description="value head dim (default head_dim)")
    linear_conv: int = Field(default=0, ge=0, description="the short causal convolution's kernel before the gated "
                                                          "delta rule (0: none)")
    experts: int = Field(default=0, ge=0, description="routed experts of MoE MLPs (0: dense; set from hf_path)")
    expert_parallel: PositiveInt = Field(default=1, description="expert-parallel degree; pliant replicates MoE "
                                                                "blocks like a dense MLP, so only 1 runs")
    zero_stage: Literal[0, 1, 2, 3]
    dtype: Literal["fp64", "fp32", "bf16", "fp16"]
    activation_checkpointing: bool = False

    @model_validator(mode="before")
    @classmethod
    def _from_model_dir(cls, data):
        if isinstance(data, dict) and data.get("hf_path") is not None:
            from .model_dir import fill_model_fields

            if not isinstance(data["hf_path"], str):
                raise ValueError(f"hf_path must be a directory path, got {data['hf_path']!r}")
            return fill_model_fields(data)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "ModelSpec":
        if self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} is not a multiple of kv_heads={self.kv_heads} (GQA needs it)")
        if self.layers % len(self.attention):
            raise ValueError(
                f"attention: a pattern of {len(self.attention)} layers does not divide layers={self.layers}"
            )
        if self.expert_parallel > 1:
            experts = f"its {self.experts} routed experts" if self.experts else "it has no routed experts, and"
            raise ValueError(f"expert_parallel = {self.expert_parallel}: expert parallelism is not supported; pliant "
                             f"runs a model's MoE blocks as transformers' own modules replicated on every rank like a "
                             f"dense MLP ({experts} run whole on each rank): set expert_parallel = 1")
        if self.linear_sp == "heads" and self.linear_kind != "gated_delta":
            raise ValueError("linear_sp = heads: the head all-to-all form runs Gated DeltaNet layers only "
                             "(linear_kind = gated_delta); pliant's linear attention runs lasp2 or ring")
        if self.linear_heads is not None and self.linear_heads % self.linear_k_heads:
            raise ValueError(f"linear_heads = {self.linear_heads} is not a multiple of linear_key_heads = "
                             f"{self.linear_k_heads} (each key head serves whole value heads)")
        return self

    # the linear layers' head layout, defaults filled in
    @property
    def linear_v_heads(self) -> int:
        return self.linear_heads or self.heads

    @property
    def linear_k_heads(self) -> int:
        return self.linear_key_heads or self.linear_v_heads

    @property
    def linear_dk(self) -> int:
        return self.linear_key_dim or self.head_dim

    @property
    def linear_dv(self) -> int:
        return self.linear_value_dim or self.head_dim

    def layer_kinds(self) -> list[str]:
        reps = self.layers // len(self.attention)
        return list(self.attention) * reps

    @property
    def n_softmax(self) -> int:
        return self.layer_kinds().count("softmax")

    @property
    def n_linear(self) -> int:
        return self.layer_kinds().count("linear")

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def param_count(self) -> float:
        if self.params is not None:
            return float(self.params)
        q = self.hidden * self.heads * self.head_dim
        kv = 2 * self.hidden * self.kv_heads * self.head_dim
        o = self.heads * self.head_dim * self.hidden
        mlp = 3 * self.hidden * self.ffn_hidden
        per_layer = q + kv + o + mlp + 2 * self.hidden
        decay = self.heads if self.linear_decay else 0
        return float(self.layers * per_layer + self.n_linear * decay + 2 * self.vocab_size * self.hidden + self.hidden)


class CostSpec(_Strict):
    """FlexSP-form coefficients (see docs/architecture.md, cost model).

    compute(L, s) = (a1_ms * f_softmax * L^2 + a2_ms * L) / s + seq_overhead_ms, plus beta_ms
    per group per micro-batch, where f_softmax is the model's fraction of softmax-attention
    layers: a1_ms is the quadratic coefficient of the model as if every layer were softmax,
    so the published all-softmax fits plug in unchanged.

    The two overheads default to 0 (the FlexSP form): `seq_overhead_ms` is a fixed time per
    sequence that every rank of its group pays (per-sequence kernel launches or loops, large
    on CPU); `step_overhead_ms` is the time of a step outside its micro-batches (gradient
    reduction, optimizer, plan exchange). The second changes no plan, only the predicted step
    time. `pliant profile` measures all of them.
    """

    a1_ms: NonNegativeFloat
    a2_ms: PositiveFloat
    beta_ms: NonNegativeFloat
    activation_bytes_per_token: PositiveFloat
    seq_overhead_ms: NonNegativeFloat = 0.0
    step_overhead_ms: NonNegativeFloat = 0.0
    source: str | None = None


class CalibrationSpec(_Strict):
    """Online calibration of the cost model from measured group and step times
    (planner/calibrate.py). Off by default: plans then depend on measured times, so two runs of
    the same job may plan differently (equal losses, not bit-equal parameters)."""

    enabled: bool = False
    every: PositiveInt = Field(default=1, description="refit every this many steps")
    window: PositiveInt = Field(default=256, description="groups kept for the fit")
    min_samples: PositiveInt = 8
    max_step: float = Field(default=2.0, gt=1.0, description="a refit moves a coefficient by at most this factor")
    max_drift: float = Field(default=8.0, gt=1.0, description="never beyond this factor of the configured value")


class PlannerSpec(_Strict):
    """Solver options. These are tuning knobs, not cluster facts, so they have defaults."""

    solver: Literal["auto", "highs", "cbc", "heuristic"] = "auto"
    time_limit_s: PositiveFloat = 1.5
    buckets: PositiveInt = 16
    max_long_sequences: PositiveInt = 12
    mip_gap: NonNegativeFloat = Field(default=0.002, description="stop once proven within this relative gap")
    power_of_two: bool = False
    max_group_size: PositiveInt | None = None
    memory_reserve_gib: NonNegativeFloat = 0.0
    max_micro_batches: PositiveInt = 16
    threads: PositiveInt = 1
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
