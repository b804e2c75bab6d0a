"""The trainer: every step, the plan decides the SP groups, the plan executor runs them
through the comm layer's operators, DeepSpeed's engine reduces gradients and steps the
optimizer.

One step, as every rank runs it:

    ids, lengths = batcher.next_batch()          # the same on every rank (lengths only)
    plan = <rank 0 plans, broadcast>             # computed while the previous step ran
    executor.run(plan, my group's documents,     # runtime/executor.py: per micro-batch, pack,
                 next-token CE / real targets    # forward under the group's SP form, backward
                 of the whole batch)
    engine.step()                                # ZeRO reduction, clipping, AdamW, LR schedule

`Trainer.from_config(cfg)` builds it all from one job config (joining the process group if
the launcher has not); `trainer.train(callbacks)` runs the steps, with metrics, checkpoints,
progress and the fault monitor attached as callbacks (runtime/callbacks.py).

Because the loss is normalised by the whole batch's real targets and every token is
computed exactly once, any plan gives the gradients of single-device training on the batch.
"""
from __future__ import annotations

import json
import math
import time
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from pliant.comm import GroupRegistry
from pliant.planner import Plan, PlanningService, get_distribution, load_length_file
from pliant.planner.baselines import static_degree
from pliant.planner.core import BATCH_ADAPTIVE
from pliant.planner.calibrate import Calibration, GroupSample, Refit, price_plan
from pliant.planner.spec import ClusterSpec, CostSpec, ModelSpec, PlannerSpec

from .checkpoint import Checkpointer, CheckpointError, config_differences
from .data import DocumentSource, GlobalBatcher, IndexedTokens, SyntheticTask
from .hf import DTYPES, build_model
from .executor import PlanExecutor
from .model import lm_loss_sum
from .packing import Sequences, real_targets
from .rank import LaunchError, deepspeed_engine, peak_memory_bytes, setup_rank
from .spec import DataSpec, TrainSpec


def lr_multiplier(step: int, spec: TrainSpec) -> float:
    """Linear warm-up to lr, then cosine decay to min_lr at the last step."""
    if spec.warmup_steps and step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    span = max(1, spec.steps - spec.warmup_steps)
    progress = min(1.0, (step - spec.warmup_steps) / span)
    floor = spec.min_lr / spec.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_source(model: ModelSpec, data: DataSpec, train: TrainSpec) -> DocumentSource:
    if data.source == "tokens":  # Megatron's indexed dataset; token ids checked against the model's vocabulary
        return IndexedTokens.open(data.token_prefix, vocab_size=model.vocab_size)  # type: ignore[arg-type]
    lengths_src = load_length_file(data.lengths_file) if data.lengths_file else get_distribution(data.dist or "")
    lengths = lengths_src.sample(data.documents, np.random.default_rng(data.seed + 1))
    lengths = np.maximum(lengths // data.length_divisor, 2)
    if train.max_len is not None:
        lengths = np.minimum(lengths, train.max_len)
    return SyntheticTask(model.vocab_size, lengths, seed=data.seed)


@dataclass
class StepResult:
    step: int
    loss: float  # mean next-token loss over the batch's real targets
    tokens: int
    targets: int
    seconds: float
    predicted_s: float
    lr: float
    group_mix: dict[int, int]
    micro_batches: int
    memory_bytes: int  # this rank's peak: CUDA max allocated, or the process's max RSS on CPU
    predicted_memory_bytes: float  # the plan's largest per-device peak
    predicted_configured_s: float | None = None  # with calibration: the plan as the configured coefficients price it
    plan_wait_s: float = 0.0  # rank 0: how long the step waited for its plan from the background planner


class Trainer:
    """One rank's training run: model (pliant's own or a Hugging Face directory), data, planner,
    DeepSpeed engine; `train_step()` is one step, `train()` the loop with its callbacks."""

    @classmethod
    def from_config(cls, cfg, registry: GroupRegistry | None = None, **train_overrides) -> "Trainer":
        """From a job config (sections cluster, model, cost, planner, train, data), joining the
        process group first if the launcher has not; `train_overrides` replace train keys."""
        train = cfg.train.model_copy(update=train_overrides) if train_overrides else cfg.train
        return cls(cfg.cluster, cfg.model, cfg.cost, cfg.planner, train, cfg.data, registry=registry)

    def __init__(self, cluster: ClusterSpec, model: ModelSpec, cost: CostSpec, planner: PlannerSpec,
                 train: TrainSpec, data: DataSpec, registry: GroupRegistry | None = None):
        setup = setup_rank(cluster, model, cost, planner, registry)
        self.rank, self.world, self.device = setup.rank, setup.world, setup.device
        self.planner, self.registry = setup.planner, setup.registry
        self.cluster, self.model_spec, self.train_spec = cluster, model, train
        self.dtype = DTYPES[model.dtype]
        self.batcher = GlobalBatcher(build_source(model, data, train), train.batch_tokens, train.max_len, train.seed)
        self.static_degree = None
        if train.plan == "static":
            self.static_degree = train.static_degree or (static_degree(self.planner, train.max_len)
                                                         if train.max_len else self.world)
        torch.manual_seed(train.seed)
        module = build_model(model, self.device, self.dtype)  # loads model.hf_path when given
        self.engine, self.optimizer, self.scheduler = self._deepspeed(module, model, train)
        self.executor = PlanExecutor(self.engine, self.registry, self.rank, self.world, self.device)
        self.step_no = 0
        self.calibrating = planner.calibration.enabled
        self.calibration: Calibration | None = None  # rank 0 refits the cost model from measured times
        if self.calibrating and self.rank == 0:
            c = planner.calibration
            self.calibration = Calibration(self.planner.cost, window=c.window, min_samples=c.min_samples,
                                           max_step=c.max_step, max_drift=c.max_drift)
        self.last_refit: Refit | None = None
        self._service = PlanningService(self.planner) if self.rank == 0 else None
        self._pending: tuple[np.ndarray, np.ndarray, Future | Plan] | None = None
        self._plan_wait = 0.0

    def _deepspeed(self, module: torch.nn.Module, model: ModelSpec, train: TrainSpec):
        opt = torch.optim.AdamW(module.parameters(), lr=train.lr, betas=tuple(train.betas), eps=train.adam_eps,
                                weight_decay=train.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, train))
        engine, optimizer, scheduler = deepspeed_engine(module, self.world, model, opt, self.device, sched,
                                                        train.grad_clip)
        return engine, optimizer, scheduler

    # ----- planning -----
    @property
    def plan_degree(self) -> int | str | None:
        """Planner.plan_for's degree for this run's plan mode: the group size of every group under
        static or dp, None when adaptive, BATCH_ADAPTIVE for batchada."""
        mode = self.train_spec.plan
        return {"adaptive": None, "dp": 1, "batchada": BATCH_ADAPTIVE}.get(mode, self.static_degree)

    def _resolve(self, pending: Future | Plan | None, lengths: np.ndarray) -> Plan:
        """A plan that may still be computing in the background; a fixed degree that cannot hold
        the batch (no plan) is an error."""
        plan = pending.result() if isinstance(pending, Future) else pending
        if plan is None:
            where = "any uniform degree" if self.plan_degree == BATCH_ADAPTIVE else f"a group of {self.plan_degree}"
            raise LaunchError(f"plan '{self.train_spec.plan}': a sequence of {int(lengths.max())} tokens does not fit "
                              f"{where}")
        return plan

    def _fetch_batch_and_plan(self) -> tuple[np.ndarray, np.ndarray, Plan]:
        """This step's batch and plan; rank 0 starts planning the next batch in the background."""
        if self._pending is None:
            ids, lengths = self.batcher.next_batch()
            pending = self.planner.plan_for(lengths, self.plan_degree) if self.rank == 0 else None
        else:
            ids, lengths, pending = self._pending
        plan = None
        waited = time.perf_counter()
        if self.rank == 0:
            plan = self._resolve(pending, lengths)
        self._plan_wait = time.perf_counter() - waited
        box = [plan]
        dist.broadcast_object_list(box, src=0)
        plan = box[0]
        # look ahead: the next batch is known from lengths alone; plan it while this step trains
        next_ids, next_lengths = self.batcher.next_batch()
        nxt = None
        if self.rank == 0:
            nxt = self._service.submit(next_lengths, self.plan_degree)
        self._pending = (next_ids, next_lengths, nxt)
        return ids, lengths, plan

    # ----- one step -----
    def train_step(self) -> StepResult:
        t0 = time.perf_counter()
        ids, lengths, plan = self._fetch_batch_and_plan()
        norm = real_targets(lengths)

        def documents(seq_ids: list[int]) -> Sequences:  # this rank reads only its group's documents
            return Sequences([torch.from_numpy(d) for d in self.batcher.read(ids[seq_ids])])

        def loss_fn(logits: torch.Tensor, pack, seq_ids) -> torch.Tensor:  # next-token CE / the batch's targets
            return lm_loss_sum(logits, pack.targets) / norm

        run = self.executor.run(plan, documents, loss_fn, timed=self.calibrating)
        lr = self.optimizer.param_groups[0]["lr"]
        self.engine.step()
        total = run.loss
        dist.all_reduce(total)
        self.step_no += 1
        mix = plan.group_mix()
        predicted_mem = max(g.peak_memory_bytes for mb in plan.micro_batches for g in mb.groups)
        seconds = time.perf_counter() - t0
        configured = None
        if self.calibrating:
            if self.calibration is not None:
                configured = price_plan(plan, lengths, self.calibration.configured) / 1e3
            self._calibrate(plan, lengths, run.micro_batch_ms, seconds)
        return StepResult(step=self.step_no, loss=float(total), tokens=int(lengths.sum()), targets=norm,
                          seconds=seconds, lr=lr,
                          predicted_s=(plan.predicted_ms + self.planner.cost.step_overhead_ms) / 1e3,
                          group_mix={int(k): int(v) for k, v in sorted(mix.items())},
                          micro_batches=len(plan.micro_batches), memory_bytes=peak_memory_bytes(self.device),
                          predicted_memory_bytes=predicted_mem, predicted_configured_s=configured,
                          plan_wait_s=self._plan_wait)

    def _calibrate(self, plan: Plan, lengths: np.ndarray, mb_ms: torch.Tensor, seconds: float) -> None:
        """Every rank's group times reach rank 0, which refits the planner's cost model: a
        group's time is its slowest rank's (planner/calibrate.py)."""
        dev = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        everyone = torch.zeros(self.world * len(mb_ms), dtype=torch.float64, device=dev)
        dist.all_gather_into_tensor(everyone, mb_ms.to(dev))
        if self.calibration is None:
            return
        times = everyone.view(self.world, -1).cpu().numpy()
        steps = [[GroupSample(g.size, tuple(int(lengths[j]) for j in g.seq_ids),
                              float(times[g.start:g.start + g.size, m].max()))
                  for g in mb.groups if g.seq_ids] for m, mb in enumerate(plan.micro_batches)]
        self.calibration.observe_step(steps, seconds * 1e3)
        if self.step_no % self.planner.spec.calibration.every == 0:
            refit = self.calibration.refit(self.step_no)
            if refit is not None:
                self.planner.cost = self.calibration.cost  # the background planner gets it with the next batch
                self.last_refit = refit

    def train(self, callbacks: list | tuple = ()) -> None:
        """Steps until train.steps (from wherever a resume left off), callbacks around each."""
        for cb in callbacks:
            cb.on_train_start(self)
        error: BaseException | None = None
        try:
            while self.step_no < self.train_spec.steps:
                for cb in callbacks:
                    cb.on_step_start(self, self.step_no + 1)
                result = self.train_step()
                for cb in callbacks:
                    cb.on_step_end(self, result)
        except BaseException as e:
            error = e
            raise
        finally:
            for cb in callbacks:
                cb.on_train_end(self, error)

    @property
    def model(self) -> torch.nn.Module:
        """The model itself (pliant's LM or an HFCausalLM), outside DeepSpeed's engine."""
        return self.engine.module

    # ----- checkpoints -----
    def checkpoint_meta(self) -> dict:
        """What, besides DeepSpeed's state, a restart needs to continue exactly: the step, the
        model's shape, the data position and the already-drawn next batch with its plan."""
        ids, lengths, pending = self._pending if self._pending is not None else (None, None, None)
        plan = None
        if self.rank == 0 and pending is not None:
            plan = self._resolve(pending, lengths).to_dict()
            self._pending = (ids, lengths, Plan.from_dict(plan))
        return {
            "step": self.step_no,
            "model": self.model_spec.model_dump(mode="json"),
            "world_size": self.world,
            "data": self.batcher.state_dict(),
            "pending_ids": None if ids is None else ids.tolist(),
            "pending_lengths": None if lengths is None else lengths.tolist(),
            "pending_plan": plan,
        }

    def save_checkpoint(self, checkpointer: Checkpointer) -> None:
        checkpointer.save(self.engine, self.step_no, self.checkpoint_meta())

    def resume(self, checkpointer: Checkpointer) -> bool:
        """Load the newest complete checkpoint, if any; False when there is none."""
        path = checkpointer.latest()
        if path is None:
            return False
        meta = json.loads((path / "meta.json").read_text())
        mine = self.model_spec.model_dump(mode="json")
        moved = frozenset({"hf_path", "name"})  # where the initial weights came from: the checkpoint replaces them
        diff = config_differences(meta["model"], mine, skip=moved)
        if diff:
            raise CheckpointError(f"checkpoint {path} is of a different model: " + ", ".join(diff))
        resize = meta["world_size"] != self.world
        if resize and self.rank == 0:
            print(f"pliant: checkpoint {path.name} was written by {meta['world_size']} ranks; loading it into "
                  f"{self.world} through DeepSpeed's universal checkpoint", flush=True)
        checkpointer.load(self.engine, path, resize=resize)
        # the learning rate the scheduler had set (not every DeepSpeed load path restores the
        # optimizer's param groups)
        for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        self.batcher.load_state_dict(meta["data"])
        self.step_no = int(meta["step"])
        if meta["pending_ids"] is not None:
            plan = None
            if self.rank == 0:  # a plan for another world is planned again
                plan = Plan.from_dict(meta["pending_plan"]) if not resize else self.planner.plan_for(
                    np.array(meta["pending_lengths"], dtype=np.int64), self.plan_degree)
            self._pending = (np.array(meta["pending_ids"], dtype=np.int64),
                             np.array(meta["pending_lengths"], dtype=np.int64), plan)
        return True

    def parameters_vector(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1).cpu() for p in self.engine.module.parameters()])

    def close(self) -> None:
        if self._service is not None:
            self._service.close()
            self._service = None

