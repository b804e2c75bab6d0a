"""The learner: W Ray actors that form one torch.distributed process group (gloo on CPU,
NCCL on GPU) and train the policy as `pliant train` trains a model: DeepSpeed ZeRO for
gradients and the optimizer, and the adaptive SP planner placing each micro-batch's samples (prompt +
response) into SP groups of the learner's ranks, as `pliant train` places documents.

Rank 0 is the group's door to the RL dataflow: it claims whole GRPO groups from the
TransferQueue, computes their advantages, plans the micro-batch and broadcasts (samples,
plan) to the other ranks (over a gloo group, also under NCCL); every rank then runs its SP
group's share of each planned micro-batch through the plan executor of `pliant train`'s
step (runtime/executor.py), with the policy loss in place of the next-token loss, and the
step's last one closes DeepSpeed's gradient accumulation. After the optimizer step rank 0
publishes the new weights, versioned, to the weight store (ZeRO 1 and 2 gather the updated
partitions into every rank's module).

    rank 0                                   every rank
    claim groups (queue) -> advantages
    plan the micro-batch -> broadcast  ----> for each planned micro-batch:
                                                 executor: my group's samples -> pack_loss
                                                 -> backward
    (the step's last groups)                 engine.step()
    publish weights (version + 1)

One sample's loss is the mean over its response tokens and the step's loss the mean over
its samples (rl/grpo.py), whatever the plan: any grouping gives the single-process gradient.
The supervised warm start runs on rank 0 alone, in plain torch, before the engine is built
from its result (it is a starting point, cached per seed, not the subject of the run).
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
import torch
import torch.distributed as dist

from pliant.planner import Plan
from pliant.planner.spec import BandwidthSpec, ClusterSpec
from pliant.runtime.checkpoint import Checkpointer
from pliant.runtime.executor import PlanExecutor
from pliant.runtime.generate import Request, generate
from pliant.comm.monitor.address import MONITOR_ADDR_ENV
from pliant.runtime.faults import FAULT_ENV
from pliant.runtime.hf import DTYPES, build_model
from pliant.runtime.monitoring import ATTEMPT_ENV, RankMonitor
from pliant.runtime.packing import Pack, Sequences
from pliant.runtime.rank import deepspeed_engine, peak_memory_bytes, setup_rank

from .common import Timed, log
from .dispatch import partition_of
from .weights import WeightPublisher
from .grpo import group_advantages, pack_loss, policy_sequences, response_logprobs
from .reward import load_reward_fn
from .sample import QUEUED_FIELDS, Sample, from_columns
from .spec import RLConfigError
from .task_protocol import LearnerCapacity, Prompt



@dataclass
class Chunk:
    """What rank 0 broadcasts: a micro-batch of whole groups' samples and its plan; `last`:
    the step's gradient is complete after it (the optimizer steps)."""

    samples: list[Sample]
    plan: Plan | None  # None: no usable sample (every rank joins the gradient reduction idle)
    last: bool
    stats: dict[str, Any] = field(default_factory=dict)  # rank 0's bookkeeping, not trained on
    step: int = 0  # the RL step it belongs to (the other ranks' step marks for the fault monitor)


FINAL_CHECKPOINT = "final checkpoint"  # rank 0's message to the others after the last step
MIN_SAMPLE_TOKENS = 2  # a sample is a prompt token and a response token at least
BOARD_TIMEOUT_S = 30.0  # a checkpoint asks the progress board which rows the driver has not written yet


def learner_cluster(cfg) -> ClusterSpec:
    """The learner group as the planner sees it: resources.learner.world ranks, the learner
    section's devices per node, memory and bandwidth."""
    res, spec = cfg.resources.learner, cfg.learner
    world = res.world
    if cfg.model.zero_stage == 3:  # rank 0 alone packs the weights for rollout and evaluates
        raise RLConfigError("model.zero_stage=3: the RL learner runs ZeRO stages 0-2 (parameters whole on every "
                            "rank, optimizer states and gradients partitioned)")
    per_node = spec.devices_per_node or world
    if world % per_node:
        raise RLConfigError(f"resources.learner.world={world} is not a multiple of learner.devices_per_node="
                            f"{per_node}")
    gpu = res.num_gpus > 0
    bandwidth = spec.bandwidth
    if bandwidth.all_to_all_gbps is not None:  # a table measured for a larger machine: the sizes this world forms
        a2a = {k: v for k, v in bandwidth.all_to_all_gbps.items() if k <= world}
        gather = {k: v for k, v in (bandwidth.all_gather_gbps or {}).items() if k <= world}
        slowest = min(bandwidth.all_to_all_gbps.values())  # a world of one never communicates: any figure
        bandwidth = BandwidthSpec(all_to_all_gbps=a2a, all_gather_gbps=gather or None) if a2a else \
            BandwidthSpec(intra_node_gbps=slowest, inter_node_gbps=slowest)
    try:
        return ClusterSpec(name="rl-learner", nodes=world // per_node, devices_per_node=per_node,
                           device="cuda" if gpu else "cpu", backend="nccl" if gpu else "gloo",
                           device_memory_gib=spec.device_memory_gib, bandwidth=bandwidth, cores=spec.cores)
    except ValueError as e:
        raise RLConfigError(f"learner: {e}") from None


def placement(chunk: Chunk, into: dict[str, dict[str, int]]) -> None:
    """Which samples went where: per SP group size, the samples its groups trained, their
    tokens, and the shortest and longest of them (added into `into`, keyed by the size)."""
    for mb in chunk.plan.micro_batches:
        for g in mb.groups:
            if not g.seq_ids:
                continue
            lengths = [chunk.samples[i].length for i in g.seq_ids]
            d = into.setdefault(str(g.size), {"samples": 0, "tokens": 0, "shortest": min(lengths), "longest": 0})
            d["samples"] += len(lengths)
            d["tokens"] += sum(lengths)
            d["shortest"] = min(d["shortest"], min(lengths))
            d["longest"] = max(d["longest"], max(lengths))


def learner_capacity(cfg) -> LearnerCapacity:
    """The longest sample the learner's memory holds (its largest SP group's), for the task
    to keep longer prompts out (rl/task.py `build_task`); an RLConfigError when no sample of
    even a few tokens fits (the model's states alone fill learner.device_memory_gib)."""
    from pliant.planner.core import Planner

    spec = cfg.learner
    planner = Planner.from_specs(learner_cluster(cfg), cfg.model, spec.cost, spec.planner)
    tokens, ranks = planner.longest_supported()
    if tokens < MIN_SAMPLE_TOKENS:
        ranks = max(planner.sizes)
        states = planner.cost.memory_coeffs(1)[0] / 2 ** 30
        raise RLConfigError(f"learner.device_memory_gib={spec.device_memory_gib:g} holds no sample: the largest SP "
                            f"group ({ranks} rank(s)) holds {tokens} tokens, the policy's model states take "
                            f"{states:.3g} GiB per rank; give the learner more memory (or ranks)")
    return LearnerCapacity(tokens, ranks, spec.device_memory_gib)


def plan_degree(cfg, task, planner) -> int | str | None:
    """Planner.plan_for's degree for learner.plan: None (adaptive), 1 (dp), LONGEST_FITS
    (uniform), or static's degree: learner.static_degree, else the smallest that holds the
    task's longest sample (its longest prompt and response)."""
    from pliant.planner.baselines import static_degree
    from pliant.planner.core import LONGEST_FITS

    spec = cfg.learner
    if spec.plan == "static":
        return spec.static_degree or static_degree(planner, task.max_prompt() + task.max_response())
    return {"adaptive": None, "dp": 1, "uniform": LONGEST_FITS}[spec.plan]


def pg_timeout_s(rl) -> float:
    """The process group's timeout: rank 0 may wait on the queue up to the stall timeout while
    the other ranks wait in the broadcast."""
    return rl.stall_timeout_s + 60.0


@ray.remote  # one thread: every method runs on the actor's main thread (the fault monitor's
class Learner:  # agent watches that thread, and its goodbye handler needs it); progress goes to a board
    def __init__(self, rank: int, cfg, task, seed: int, generation: int = 0):
        res = cfg.resources.learner
        torch.set_num_threads(res.threads)
        self.rank, self.world, self.cfg, self.rl, self.task, self.seed = rank, res.world, cfg, cfg.rl, task, seed
        self.cluster = learner_cluster(cfg)
        self.device = torch.device("cuda", 0) if self.cluster.device == "cuda" else torch.device("cpu")
        self.dtype = DTYPES[cfg.model.dtype]
        self.version = 0
        self.generation = generation  # which start of the learner group this is (restarts count up)
        self.steps: list[dict[str, Any]] = []
        self.unrecorded: list[tuple[dict[str, Any], Any]] = []
        self.trained_groups: dict[int, int] = {}
        self.duplicates = 0
        self.skipped: list[dict] = []
        self.checkpointer: Checkpointer | None = None
        self.saved: Path | None = None  # the newest checkpoint this run wrote
        self.saved_version = -1
        self.board = None  # rank 0's ProgressBoard (run): where the driver reads the steps
        self.publisher: WeightPublisher | None = None  # rank 0: the weights' way to the rollout workers
        self.run_meta: dict[str, Any] = {}  # what every checkpoint of this run carries besides the state

    # ----- the process group -----
    def address(self) -> tuple[str, int]:
        """Rank 0: this node's address and a free port for the group's rendezvous."""
        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def join(self, addr: str, port: int, monitor_addr: str | None = None, faults: str = "",
             run_dir: str | None = None) -> None:
        """Join the learner's process group and build the rank's pieces, as every training
        rank does (runtime/rank.py: the planner and the SP groups). First, before DeepSpeed
        starts, the fault monitor's side of this rank (runtime/monitoring.py): its agent
        reports to the master at `monitor_addr` (None: no agent); `faults`: injected faults
        (PLIANT_FAULT's JSON), which fire in the learner generation they name (`attempt`)."""
        os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world), LOCAL_RANK="0",  # Ray shows each actor its own GPU
                          **{ATTEMPT_ENV: str(self.generation), FAULT_ENV: faults})
        if monitor_addr:
            os.environ[MONITOR_ADDR_ENV] = monitor_addr
        else:
            os.environ.pop(MONITOR_ADDR_ENV, None)
        self.monitor = RankMonitor(self.cfg.faults, Path(run_dir) if run_dir else None)
        cfg = self.cfg
        self.setup = setup_rank(self.cluster, cfg.model, cfg.learner.cost, cfg.learner.planner,
                                timeout_s=pg_timeout_s(self.rl))
        # control messages (samples, plans, stats) travel on CPU even when NCCL carries the training
        self.control = dist.new_group(backend="gloo") if self.cluster.backend != "gloo" else dist.group.WORLD

    # ----- warm start (rank 0) -----
    def warm_start(self, state: dict | None = None) -> tuple[dict, list[float]]:
        """Supervised steps on the task's answers in plain torch (or a given state); returns
        the state and the losses."""
        torch.manual_seed(self.seed)
        model = build_model(self.cfg.model, self.device, self.dtype)
        losses: list[float] = []
        if state is not None:
            model.load_state_dict(state)
            return state, losses
        rl, warmup = self.rl, self.rl.sft_warmup_steps
        # a linear warm-up and the RL grad_clip: without them, some seeds' runs stalled at the
        # unigram loss (2 of 10 seeds at loss ~2 after 400 steps; with them every one ends at 0.33-0.58)
        opt = torch.optim.AdamW(model.parameters(), lr=rl.sft_lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        for _ in range(rl.sft_steps):
            examples = self.task.sft_examples(rl.sft_batch)
            if any(not p.answer for p in examples):
                raise RLConfigError("rl.sft_steps > 0 needs answers (task.answer_key) for the supervised warm start")
            lps = response_logprobs(model, [list(p.tokens) for p in examples], [list(p.answer) for p in examples])
            loss = -torch.cat(lps).mean()
            opt.zero_grad()
            loss.backward()
            if rl.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), rl.grad_clip)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, losses

    # ----- the engine (every rank) -----
    def build(self, state: dict) -> None:
        """The policy from `state` under DeepSpeed, the planner and the SP groups."""
        torch.manual_seed(self.seed)
        module = build_model(self.cfg.model, self.device, self.dtype)
        module.load_state_dict(state)
        rl = self.rl
        opt = torch.optim.AdamW(module.parameters(), lr=rl.lr, weight_decay=rl.weight_decay)
        self.engine, self.optimizer, _ = deepspeed_engine(module, self.world, self.cfg.model, opt, self.device,
                                                          None, rl.grad_clip)
        self.planner = self.setup.planner
        self.executor = PlanExecutor(self.engine, self.setup.registry, self.rank, self.world, self.device)
        self.fixed_degree = plan_degree(self.cfg, self.task, self.planner)

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.module

    def parameters_vector(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1).cpu().to(torch.float64) for p in self.model.parameters()])

    # ----- one micro-batch and the optimizer step (every rank) -----
    def plan(self, samples: list[Sample]) -> Plan:
        lengths = [smp.length for smp in samples]
        plan = self.planner.plan_for(lengths, self.fixed_degree)
        if plan is None:
            longest, size = self.planner.longest_supported()
            where = f"a group of {self.fixed_degree}" if isinstance(self.fixed_degree, int) else \
                f"any group (the largest, of {size} ranks, holds {longest} tokens)"
            raise RLConfigError(f"learner.plan {self.cfg.learner.plan!r}: a sample of {max(lengths)} tokens does not "
                                f"fit {where}")
        return plan

    def train_chunk(self, chunk: Chunk, version: int | None = None) -> dict[str, Any]:
        """Forward and backward of every planned micro-batch of `chunk` on this rank (all ranks
        call it with the same chunk); gradients add up until the step's `last` one. Returns
        the chunk's statistics, summed over the group: per-sample mean importance weight,
        mean KL, clipped tokens, response tokens."""
        version = self.version if version is None else version
        rl, n = self.rl, len(chunk.samples)
        stats = torch.zeros(max(n, 1), 4, dtype=torch.float64, device=self.device)

        def samples(seq_ids: list[int]) -> Sequences:
            return policy_sequences([chunk.samples[i] for i in seq_ids], version, rl.samples_per_step)

        def loss_fn(logits: torch.Tensor, pack: Pack, seq_ids: list[int]) -> torch.Tensor:
            loss, part = pack_loss(logits, pack, len(seq_ids), rl.clip_eps, rl.kl_coef, rl.is_cap, rl.temperature)
            stats[torch.tensor(seq_ids, device=self.device)] += part
            return loss

        self.executor.run(chunk.plan, samples, loss_fn, closes_step=chunk.last)
        dist.all_reduce(stats)  # each sample's tokens sit in one group: the sum is the sample's
        tokens = stats[:n, 3].clamp(min=1)
        return {"is_weights": (stats[:n, 0] / tokens).tolist(), "kl": (stats[:n, 1] / tokens).tolist(),
                "clipped": float(stats[:n, 2].sum()), "tokens": float(stats[:n, 3].sum())}

    def optimizer_step(self) -> float:
        """The optimizer step; first (rank 0) the publish's copies of the weights it changes
        must be done. Returns the seconds waited for them."""
        waited = self.publisher.before_update() if self.publisher is not None else 0.0
        self.engine.step()
        self.version += 1
        return waited

    def checkpoint_due(self) -> None:
        """Every rank, after the step's optimizer step (rank 0 after its metrics row, which the
        checkpoint carries): the write of rl.checkpoint_every."""
        every = self.rl.checkpoint_every
        if self.checkpointer is not None and every and self.version % every == 0:
            self.save_checkpoint()

    # ----- checkpoints (every rank: DeepSpeed writes each rank's ZeRO partitions) -----
    def save_checkpoint(self) -> Path:
        """The learner's state as `pliant train` writes it (runtime/checkpoint.py: atomic, a
        COMPLETE marker), so `pliant export --run-dir RUN` reads an RL run too; step = the
        policy version. With it, what `pliant rl --resume` needs (rl/resume.py): the run's
        identity, the groups trained, the held-out score before RL."""
        since = self.saved_version if self.saved_version >= 0 else 0
        if self.board is not None:  # and the rows the driver has not written yet, however old
            try:
                unwritten = ray.get(self.board.unwritten.remote(), timeout=BOARD_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                unwritten = 0  # no answer: every row goes with the checkpoint
            since = since if unwritten is None else min(since, unwritten)
        recent = [{x: y for x, y in row.items() if x != "staleness"} for row in  # unrecorded: not on the board yet
                  [*(r for r in self.steps if r["step"] >= since), *(row for row, _ in self.unrecorded)]]
        meta = {"step": self.version, "version": self.version, "run": "rl", "world_size": self.world,
                "model": self.cfg.model.model_dump(mode="json"), **self.run_meta,
                "trained_groups": {str(g): s for g, s in self.trained_groups.items()},
                "recent_steps": recent}  # the metrics rows a killed driver may not have written
        if self.board is not None:  # the driver's stall watchdog waits for a write, as for a step
            self.board.writing.remote(True)
        try:
            self.saved = self.checkpointer.save(self.engine, self.version, meta)
        finally:
            if self.board is not None:
                self.board.writing.remote(False)
        self.saved_version = self.version
        return self.saved

    def restore(self, path: str, world_size: int) -> int:
        """Every rank: the learner's state from an RL checkpoint (written by `world_size` ranks:
        another world loads through DeepSpeed's universal form); returns its version."""
        ckpt = Checkpointer(Path(path).parent.parent, self.rl.keep_checkpoints)
        # ZeRO 0 keeps the optimizer whole in the model's file: any world loads it as it is
        resize = world_size != self.world and self.cfg.model.zero_stage > 0
        meta = ckpt.load(self.engine, Path(path), resize=resize, rng_of_rank0=True)
        self.version = self.saved_version = int(meta["version"])
        self.trained_groups = {int(g): s for g, s in meta["trained_groups"].items()}
        return self.version


    # ----- rank 0: the dataflow -----
    def _usable(self, members: list[Sample]) -> list[Sample]:
        """The samples of a group that can be trained (logged skips: an empty response, no
        reward); a group needs two to have an advantage."""
        ok = []
        for smp in members:
            if not smp.response:
                self.skipped.append({"group": smp.group, "why": "empty response"})
                log(f"sample of group {smp.group} has an empty response; skipped")
            elif smp.reward is None:
                self.skipped.append({"group": smp.group, "why": "no reward"})
            else:
                ok.append(smp)
        return ok if len(ok) >= 2 else []

    def make_chunk(self, groups: list[list[Sample]], last: bool, step: int = 0) -> Chunk:
        """The trainable samples of whole groups, with advantages, and their plan. The chunk
        is broadcast to every rank, so its samples carry the prompt's ids only."""
        usable = [ok for ok in (self._usable(members) for members in groups) if ok]
        samples: list[Sample] = []
        for members in usable:
            r = torch.tensor([smp.reward for smp in members], dtype=torch.float64)
            for smp, a in zip(members, group_advantages(r, len(members)).tolist()):
                samples.append(replace(smp, prompt=Prompt(smp.prompt.uid, tuple(smp.prompt.tokens)), adv=a))
        t = time.perf_counter()
        plan = self.plan(samples) if samples else None
        return Chunk(samples, plan, last, step=step, stats={"rewards": [smp.reward for smp in samples],
                                                            "plan_s": time.perf_counter() - t})

    def _broadcast(self, msg: Any) -> Any:
        box = [msg]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def publish(self, store) -> float:
        """Hand the store this version's weights (rl/weights.py: buckets copied by a thread
        while the next step trains); rank 0 goes on at once (the store keeps the newest
        version whatever order its calls run in). Returns the seconds it took here."""
        if self.publisher is None or self.publisher.store is not store:
            self.publisher = WeightPublisher(self.model, store, self.generation)
        return self.publisher.publish(self.version)

    def _record(self, block: bool = False) -> None:
        """Move the finished steps whose queue statistics have come to `self.steps`."""
        while self.unrecorded:
            row, reply = self.unrecorded[0]
            if not block and not ray.wait([reply], timeout=0)[0]:
                return
            _, stats = ray.get(reply)
            row["queue_held"] = stats["held"]
            self.steps.append(row)
            self.unrecorded.pop(0)
            if self.board is not None:
                self.board.add.remote(row)

    def run(self, tq=None, store=None, sync: bool = False, run_dir: str | None = None,
            run_meta: dict[str, Any] | None = None, board=None) -> dict[str, Any]:
        """The RL loop from step `self.version` (0, or where a restored checkpoint left off);
        rank 0 reads the queue, the others train what it broadcasts. With `run_dir`, the
        learner checkpoints there (rl.checkpoint_every, and after the last step), each
        checkpoint carrying `run_meta`."""
        self.checkpointer = Checkpointer(Path(run_dir), self.rl.keep_checkpoints,
                                         on_stage=self.monitor.checkpoint_stage) if run_dir else None
        self.run_meta = dict(run_meta or {})
        self.board = board if self.rank == 0 else None
        try:
            out = self._run(tq, store, sync)
        except BaseException as e:
            self.monitor.close_on(e)
            raise
        self.monitor.close("finished")
        return out

    def _run(self, tq, store, sync: bool) -> dict[str, Any]:
        if self.rank != 0:
            step = None
            while (chunk := self._broadcast(None)) is not None:
                if isinstance(chunk, str) and chunk == FINAL_CHECKPOINT:
                    self.save_checkpoint()
                    continue
                if chunk.step != step:
                    step = chunk.step
                    self.monitor.begin_step(step)
                self.train_chunk(chunk)
                if chunk.last:
                    self.optimizer_step()
                    self.checkpoint_due()
            return {"rank": self.rank}
        try:
            out = self._lead(tq, store, sync)
            if self.checkpointer is not None and self.saved_version != self.version:
                self._broadcast(FINAL_CHECKPOINT)  # the others join the write
                self.save_checkpoint()
            return {**out, "checkpoint": None if self.saved is None else str(self.saved),
                    "checkpoint_step": self.saved_version}
        finally:
            self._broadcast(None)  # the others stop (also when rank 0 failed)

    def _lead(self, tq, store, sync: bool) -> dict[str, Any]:
        rl = self.rl
        timer = Timed()
        self.publish(store)
        per_step = rl.samples_per_step
        take = per_step if sync else rl.micro_batch_groups * rl.group_size  # sync: the whole step's batch

        def claim(step: int, groups_left: int):
            """The next batch of `step`, asked for ahead: its claim travels (and waits in the
            controller) while the learner works on the batch before. Async takes whatever
            whole groups are ready, up to a micro-batch: groups wait for the learner only
            while it is busy, and a step's last group is all that is left to train once it
            lands (the gradient is the sum over the step's groups, however they are batched)."""
            want = min(take, groups_left * rl.group_size)
            least = want if sync else rl.group_size
            return tq.get_async("learner", list(QUEUED_FIELDS), least, want, 1.0, True,
                                partition_of(self.generation, step), ack_later=True)

        first = self.version  # a resumed run goes on from its checkpoint's step
        pending = claim(first, rl.prompts_per_step)
        for step in range(first, rl.steps):
            self.monitor.begin_step(step)
            t0 = time.perf_counter()
            seen_groups: set[int] = set()
            rewards, staleness, weights, kls, trained, latency = [], [], [], [], 0, []
            tokens, plan_s, micro, mix, step_groups, train_s, placed = 0, 0.0, 0, {}, [], 0.0, {}
            while len(seen_groups) < rl.prompts_per_step:
                self.monitor.pause(True)  # waiting for rollouts: the others' wait in the broadcast is not a hang
                try:
                    batch = timer.wait(pending.result)
                finally:
                    self.monitor.pause(False)
                if not batch.ids:  # the claim timed out: ask again
                    pending = claim(step, rl.prompts_per_step - len(seen_groups))
                    continue
                got = from_columns(batch.data)
                latency.append(time.time() - got[0].written_at)  # rollout's write -> learner's read
                fresh = [smp for smp in got if smp.group not in self.trained_groups]
                self.duplicates += len(got) - len(fresh)
                seen_groups |= {smp.group for smp in got}
                # in group order: a sync step's micro-batches do not depend on the order its groups landed in
                fresh_groups = sorted({smp.group for smp in fresh})
                last_batch = len(seen_groups) >= rl.prompts_per_step
                if not last_batch:
                    pending = claim(step, rl.prompts_per_step - len(seen_groups))
                elif step + 1 < rl.steps:  # the next step's first batch (its data does not depend on this update)
                    pending = claim(step + 1, rl.prompts_per_step)
                parts = [fresh_groups[j:j + rl.micro_batch_groups]
                         for j in range(0, len(fresh_groups), rl.micro_batch_groups)] or [[]]
                for j, part in enumerate(parts):  # one chunk per micro-batch of groups
                    for g in part:
                        self.trained_groups[g] = step
                    step_groups += part
                    # a group's samples in one order whatever order they finished in
                    members = [sorted((smp for smp in fresh if smp.group == g), key=lambda x: (x.response, x.behav_logp))
                               for g in part]
                    self.duplicates += sum(max(0, len(m) - rl.group_size) for m in members)
                    chunk = self.make_chunk([m[:rl.group_size] for m in members],
                                            last=last_batch and j == len(parts) - 1, step=step)
                    if not chunk.samples and not chunk.last:
                        continue
                    self._broadcast(chunk)
                    started = time.perf_counter()
                    out = self.train_chunk(chunk)
                    train_s += time.perf_counter() - started
                    if chunk.plan is not None:
                        micro += len(chunk.plan.micro_batches)
                        for size, count in chunk.plan.group_mix().items():
                            mix[int(size)] = mix.get(int(size), 0) + int(count)
                        placement(chunk, placed)
                    rewards += chunk.stats["rewards"]
                    plan_s += chunk.stats["plan_s"]
                    staleness += [step - smp.version for smp in chunk.samples]
                    weights += out["is_weights"]
                    kls += out["kl"]
                    tokens += sum(smp.length for smp in chunk.samples)
                    trained += len(chunk.samples)
            started = time.perf_counter()
            publish_wait_s = self.optimizer_step()
            train_s += time.perf_counter() - started - publish_wait_s
            publish_wait_s += self.publish(store)
            row = {"step": step, "version": self.version, "wall": time.time(), "seconds": time.perf_counter() - t0,
                   "samples": trained, "tokens": tokens, "reward": sum(rewards) / len(rewards) if rewards else None,
                   "max_staleness": max(staleness) if staleness else 0, "staleness": staleness,
                   "is_weight_min": min(weights) if weights else None,
                   "is_weight_max": max(weights) if weights else None, "kl": sum(kls) / len(kls) if kls else 0.0,
                   "queue_latency_s": max(latency) if latency else None, "group_mix": mix, "micro_batches": micro,
                   "plan_s": plan_s, "train_s": train_s, "placement": placed, "publish_wait_s": publish_wait_s,
                   "memory_bytes": peak_memory_bytes(self.device), "groups": sorted(step_groups)}
            self.unrecorded.append((row, tq.clear_partition(partition_of(self.generation, step), wait=False)))
            self.checkpoint_due()
            self._record()
        self._record(block=True)
        self.publisher.before_update()
        ray.get(self.publisher.last)
        return {"steps": self.steps, "trained_groups": self.trained_groups, "duplicates": self.duplicates,
                "skipped": self.skipped, "world": self.world, **timer.report()}

    # ----- evaluation (rank 0) -----
    def evaluate(self, prompts: list, seed: int) -> float | None:
        """The policy's mean reward on held-out prompts (one sample each, at the rollout
        temperature, seeded): the learning measure that does not depend on the mode. A
        prompt whose reward function raises is left out (logged)."""
        fn = load_reward_fn(self.rl.reward_fn)
        model = self.model if hasattr(self, "engine") else None
        if model is None:
            raise RuntimeError("evaluate needs the engine: call build first")
        model.eval()
        try:
            out = generate(model, [Request(list(p.tokens), self.task.max_response(), tag=p) for p in prompts],
                           self.rl.rollout_slots, self.task.stop_tokens, self.rl.temperature,
                           torch.Generator(device=self.device).manual_seed(seed))
        finally:
            model.train()
        scores = []
        for c in out:
            try:
                scores.append(float(fn(self.task.reward_sample(c.tag, c.response))))
            except Exception as e:  # noqa: BLE001 (a user's reward function: log it, leave the prompt out)
                log(f"reward function raised on held-out prompt {c.tag.uid}: {type(e).__name__}: {e}")
        return sum(scores) / len(scores) if scores else None
