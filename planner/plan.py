"""Plans: what the runtime executes each step, as dataclasses that round-trip through JSON.

A `Plan` covers one global batch. It has one or more micro-batches (run one after the
other); each micro-batch splits the world into SP groups (contiguous rank ranges) and gives
every sequence of the micro-batch to exactly one group. Sequence ids index the batch's
`lengths`.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pliant.io import atomic_write_text, strict_dumps


@dataclass(frozen=True)
class SPForm:
    """How an SP group runs its attention layers. The planner decides it (`CostModel.sp_form`),
    the plan carries it, and the runtime executes it: nothing below decides again."""

    softmax: str  # "ulysses", "lasp2h", or "none" (a group of one)
    linear: str  # "lasp2", "ring", "heads" (Gated DeltaNet's head all-to-all), or "none" (a group of one)


SOLO_FORM = SPForm("none", "none")


@dataclass
class GroupPlan:
    start: int
    size: int
    seq_ids: list[int]
    tokens: int  # real (unpadded) tokens
    predicted_ms: float  # beta + sum of sequence times; 0 for an idle group
    peak_memory_bytes: float  # per device
    softmax_sp: str  # how the group runs softmax layers: "ulysses", "lasp2h" or "none" (group of one)
    linear_sp: str  # and linear-attention layers: "lasp2", "ring", "heads" or "none" (group of one)

    @property
    def ranks(self) -> list[int]:
        return list(range(self.start, self.start + self.size))

    @property
    def form(self) -> SPForm:
        return SPForm(self.softmax_sp, self.linear_sp)

    def holds(self, rank: int) -> bool:
        return self.start <= rank < self.start + self.size


@dataclass
class SolverStats:
    source: str  # which method produced the micro-batch: "milp", "heuristic" or "fixed"
    status: str  # solver status: "optimal", "time_limit", "not_run", "failed: ..."
    solve_s: float
    heuristic_ms: float | None = None
    milp_ms: float | None = None  # realised makespan of the MILP's answer
    milp_objective_ms: float | None = None  # the MILP model's own objective (bucketed)
    milp_bound_ms: float | None = None
    gap: float | None = None  # (realised makespan - MILP bound) / realised makespan
    n_variables: int | None = None
    n_constraints: int | None = None
    warm_start: bool | None = None  # whether the heuristic's schedule was accepted as the MILP's start
    milp_exact: bool | None = None  # every sequence placed individually: the MILP's bound bounds the micro-batch


@dataclass
class MicroBatchPlan:
    groups: list[GroupPlan]
    predicted_ms: float
    stats: SolverStats

    @property
    def seq_ids(self) -> list[int]:
        return [i for g in self.groups for i in g.seq_ids]

    def group_of(self, rank: int) -> GroupPlan:
        """The group that holds `rank` (every rank is in exactly one)."""
        return next(g for g in self.groups if g.holds(rank))


@dataclass
class Plan:
    strategy: str  # "adaptive", "fixed-8", ...
    world_size: int
    devices_per_node: int
    lengths: list[int]
    micro_batches: list[MicroBatchPlan]
    predicted_ms: float  # sum over micro-batches
    lower_bound_ms: float
    solve_s: float
    micro_batch_candidates: dict[int, float | None] = field(default_factory=dict)  # count -> predicted ms

    # ----- views -----
    def group_mix(self) -> Counter[int]:
        """Number of non-idle groups of each size, over all micro-batches."""
        return Counter(g.size for mb in self.micro_batches for g in mb.groups if g.seq_ids)

    def device_share_by_size(self) -> dict[int, float]:
        """Fraction of device-micro-batches spent in groups of each size (idle groups excluded)."""
        total = self.world_size * len(self.micro_batches)
        counts: Counter[int] = Counter()
        for mb in self.micro_batches:
            for g in mb.groups:
                if g.seq_ids:
                    counts[g.size] += g.size
        return {s: c / total for s, c in sorted(counts.items())}

    @property
    def gap_to_lower_bound(self) -> float:
        return self.predicted_ms / self.lower_bound_ms - 1.0

    # ----- serialisation -----
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["micro_batch_candidates"] = {str(k): v for k, v in self.micro_batch_candidates.items()}
        return d

    def to_json(self, path: str | Path | None = None, indent: int | None = 1) -> str:
        text = strict_dumps(self.to_dict(), indent=indent)
        if path is not None:
            atomic_write_text(Path(path), text)
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        mbs = [
            MicroBatchPlan(
                groups=[GroupPlan(**g) for g in mb["groups"]],
                predicted_ms=mb["predicted_ms"],
                stats=SolverStats(**mb["stats"]),
            )
            for mb in d["micro_batches"]
        ]
        rest = {k: v for k, v in d.items() if k != "micro_batches"}
        rest["micro_batch_candidates"] = {int(k): v for k, v in rest.get("micro_batch_candidates", {}).items()}
        return cls(micro_batches=mbs, **rest)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))
