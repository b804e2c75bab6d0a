"""One RL run (`pliant rl`): a Ray cluster (local, or the one `ray job submit` runs in), the
TransferQueue, the dispatcher and weight store, and the workers; the warm start; progress
(reward, throughput, staleness, queue depth) as it trains, metrics to JSON lines; a rollout
worker that dies is started again and its unfinished groups are handed out again.

    sync        generate the whole step's batch, then train on it (the baseline)
    async k     rollout runs ahead of training by at most k policy versions, and the trainer
                streams micro-batches as soon as whole groups are ready
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray
import torch

from .dispatch import Dispatcher, WeightStore
from .spec import RLResourceError
from .task import VOCAB, CopyTask
from .transfer_queue import TransferQueue
from .workers import ReferenceWorker, RewardWorker, RolloutWorker, Trainer, log

TASKS = ["reward", "reference", "trainer"]


@dataclass
class RunResult:
    mode: str
    staleness: int
    seed: int
    steps: list[dict[str, Any]]
    wall_s: float
    tokens: int
    samples: int
    rollout: list[dict[str, Any]]
    trainer: dict[str, Any]
    reward_worker: dict[str, Any]
    restarts: int
    dispatcher: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.wall_s

    def summary(self) -> dict[str, Any]:
        roll_idle = [r["idle_fraction"] for r in self.rollout]
        return {"mode": self.mode, "staleness": self.staleness, "seed": self.seed, "wall_s": self.wall_s,
                "tokens": self.tokens, "samples": self.samples, "tokens_per_s": self.tokens_per_s,
                "samples_per_s": self.samples_per_s,
                "max_staleness": max((s["max_staleness"] for s in self.steps), default=0),
                "rollout_idle_fraction": sum(roll_idle) / len(roll_idle) if roll_idle else None,
                "trainer_idle_fraction": self.trainer["idle_fraction"], "restarts": self.restarts,
                "reward_first": self.steps[0]["reward"], "reward_last": self.steps[-1]["reward"]}


def ensure_ray(resources) -> None:
    if ray.is_initialized():
        return
    if resources.ray_address:
        ray.init(address=resources.ray_address, log_to_driver=True)
    else:
        ray.init(num_cpus=resources.num_cpus, include_dashboard=False, log_to_driver=True)


def check_resources(resources) -> None:
    """Every worker's CPUs and GPUs against what the Ray cluster has: a clear error, not a
    worker that waits forever to be scheduled."""
    have = ray.cluster_resources()
    workers = [("rollout", resources.rollout_workers, resources.rollout), ("trainer", 1, resources.trainer),
               ("reference", 1, resources.reference), ("reward", 1, resources.reward)]
    for kind, attr in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
        need = sum(n * getattr(a, attr) for _, n, a in workers)
        if need > have.get(kind, 0.0) + 1e-9:
            asked = ", ".join(f"{name} {n} x {getattr(a, attr):g}" for name, n, a in workers)
            raise RLResourceError(f"resources: the workers ask for {need:g} {kind} ({asked}), but the Ray cluster "
                                  f"has {have.get(kind, 0.0):g}")


def warm_start(trainer, cache: Path | None) -> list[float]:
    """The supervised warm start in the run's trainer, or the cached one (every mode of a
    seed starts from the same policy); returns the supervised losses ([] from the cache)."""
    cached = torch.load(cache) if cache is not None and cache.is_file() else None
    state, losses = ray.get(trainer.warm_start.remote(cached))
    if cached is None and cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(cache)
    return losses


def run(cfg, run_dir: Path, mode: str | None = None, staleness: int | None = None, seed: int | None = None,
        sft_cache: Path | None = None, on_step: Callable[[dict], None] | None = None,
        kill_rollout_at_step: int | None = None) -> RunResult:
    rl, res = cfg.rl, cfg.resources
    mode = mode or rl.mode
    k = 0 if mode == "sync" else (rl.staleness if staleness is None else staleness)
    seed = rl.seed if seed is None else seed
    if cfg.model.vocab_size < VOCAB:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size}: the copy task needs at least {VOCAB}")
    ensure_ray(res)
    check_resources(res)
    run_dir.mkdir(parents=True, exist_ok=True)
    task = CopyTask.from_spec(cfg.task, seed=seed)
    capacity = rl.queue_capacity or (k + 2) * rl.samples_per_step
    tq = TransferQueue.create(capacity, TASKS, units=2)
    dispatcher = Dispatcher.remote(task, rl.prompts_per_step, rl.steps, k)
    store = WeightStore.remote()
    trainer = Trainer.options(num_cpus=res.trainer.num_cpus, num_gpus=res.trainer.num_gpus).remote(
        cfg.model, rl, CopyTask.from_spec(cfg.task, seed=10_000 + seed), res.trainer.threads, seed)
    sft_losses = warm_start(trainer, sft_cache)
    if sft_losses:
        log(f"warm start: {len(sft_losses)} supervised steps, loss {sft_losses[0]:.3f} -> {sft_losses[-1]:.3f}")

    def rollout(w: int):
        return RolloutWorker.options(num_cpus=res.rollout.num_cpus, num_gpus=res.rollout.num_gpus).remote(
            w, cfg.model, rl, task.max_prompt(), task.max_response(), res.rollout.threads, seed)

    reward = RewardWorker.options(num_cpus=res.reward.num_cpus).remote(rl.reward_fn, res.reward.threads)
    reference = ReferenceWorker.options(num_cpus=res.reference.num_cpus, num_gpus=res.reference.num_gpus).remote(
        cfg.model, res.reference.threads, seed)
    t0 = time.time()
    train_ref = trainer.run.remote(tq, store, mode == "sync")
    workers = {w: rollout(w) for w in range(res.rollout_workers)}
    runs = {w: a.run.remote(tq, dispatcher, store) for w, a in workers.items()}
    side = [reward.run.remote(tq), reference.run.remote(tq, store)]
    metrics = (run_dir / "metrics.jsonl").open("a")
    shown, restarts, results = 0, 0, {}
    try:
        while True:
            done, _ = ray.wait([train_ref], timeout=0.5)
            steps = ray.get(trainer.progress.remote())
            for s in steps[shown:]:
                row = {"mode": mode, "staleness_bound": k, "seed": seed, **{x: y for x, y in s.items()
                                                                              if x != "staleness"}}
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                if on_step:
                    on_step(row)
            shown = len(steps)
            if kill_rollout_at_step is not None and shown >= kill_rollout_at_step and restarts == 0:
                log(f"killing rollout worker 0 at step {shown} (fault injection)")
                ray.kill(workers[0], no_restart=True)
                kill_rollout_at_step = None
            for w, ref in list(runs.items()):
                ready, _ = ray.wait([ref], timeout=0)
                if not ready:
                    continue
                try:
                    results[w] = ray.get(ref)
                    del runs[w]
                except ray.exceptions.RayActorError as e:
                    lost = ray.get(dispatcher.worker_lost.remote(w))
                    restarts += 1
                    log(f"rollout worker {w} died ({type(e).__name__}); restarting it, its groups {lost} go out "
                        f"again")
                    workers[w] = rollout(w)
                    runs[w] = workers[w].run.remote(tq, dispatcher, store)
            if done:
                break
        trained = ray.get(train_ref)
        wall = time.time() - t0
        tq.close()
        for w, ref in runs.items():
            results[w] = ray.get(ref)
        reward_out, _ = ray.get(side)
        counts = ray.get(dispatcher.counts.remote())
    finally:
        metrics.close()
        for a in [trainer, reward, reference, dispatcher, store, tq.controller, *tq.units, *workers.values()]:
            ray.kill(a)
    steps = trained["steps"]
    return RunResult(mode, k, seed, steps, wall, sum(s["tokens"] for s in steps), sum(s["samples"] for s in steps),
                     [results[w] for w in sorted(results)], {x: trained[x] for x in trained if x != "steps"},
                     reward_out, restarts, counts)
