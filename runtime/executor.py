"""The plan executor: one rank's share of a plan's micro-batches, the same for `pliant train`
and the RL learner (only the sequences and the loss differ, and the caller gives both).

    for each micro-batch of the plan:
        group = the group of the plan that holds this rank
        if the group has sequences:
            pack = shard_pack(its sequences, group, form=the plan's SP form for it)
            loss = loss_fn(model(pack.tokens, pack.ctx), pack, the sequences' ids)
        else:                                   # idle in this micro-batch:
            loss = 0 * sum(parameters)          # still join DeepSpeed's gradient reduction
        engine.backward(loss * world)           # DeepSpeed averages gradients over ranks: undo it
    (the caller's engine.step() ends the step)

The loss the caller gives is normalised over the whole step (all ranks, all micro-batches),
so the ranks' losses add up to the single-process loss of the step and any plan gives its
gradients.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from pliant.comm import GroupRegistry
from pliant.planner import Plan

from .packing import Pack, Sequences

# seq_ids -> their Sequences; (logits, pack, seq_ids) -> this rank's loss
SequencesFn = Callable[[list[int]], Sequences]
LossFn = Callable[[torch.Tensor, Pack, list[int]], torch.Tensor]


@dataclass
class Executed:
    loss: torch.Tensor  # float64 scalar: the sum of this rank's losses (detached)
    micro_batch_ms: torch.Tensor  # float64 [micro-batches]: this rank's time in each (0 where idle or untimed)


class PlanExecutor:
    """Runs plans on one rank: `engine` is DeepSpeed's engine over the model, `registry` the
    SP groups, `rank` / `world` this rank's place in the process group."""

    def __init__(self, engine, registry: GroupRegistry, rank: int, world: int, device: torch.device):
        self.engine, self.registry, self.rank, self.world, self.device = engine, registry, rank, world, device

    def run(self, plan: Plan | None, sequences: SequencesFn, loss_fn: LossFn, closes_step: bool = True,
            timed: bool = False) -> Executed:
        """Forward and backward of every micro-batch of `plan` (None: one idle micro-batch, so
        the rank still joins the gradient reduction); the last one closes DeepSpeed's gradient
        accumulation when `closes_step`. `timed`: measure this rank's time per busy micro-batch
        (the calibration's samples; CUDA is synchronised first)."""
        engine = self.engine
        engine.train()
        micro = plan.micro_batches if plan is not None else [None]
        total = torch.zeros((), dtype=torch.float64, device=self.device)  # NCCL reduces device tensors only
        times = torch.zeros(len(micro), dtype=torch.float64)
        for m, mb in enumerate(micro):
            t0 = time.perf_counter()
            engine.set_gradient_accumulation_boundary(closes_step and m == len(micro) - 1)
            mine = mb.group_of(self.rank) if mb is not None else None
            if mine is not None and mine.seq_ids:
                pack = sequences(mine.seq_ids).shard(self.registry.get(mine.start, mine.size), self.device,
                                                     mine.form)
                loss = loss_fn(engine(pack.tokens, pack.ctx), pack, mine.seq_ids)
            else:
                loss = sum(p.sum() for p in engine.module.parameters()) * 0.0
            total += loss.detach().to(torch.float64)
            engine.backward(loss * self.world)
            if timed and mine is not None and mine.seq_ids:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                times[m] = (time.perf_counter() - t0) * 1e3
        return Executed(total, times)
