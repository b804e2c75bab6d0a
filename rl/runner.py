"""One RL run (`pliant rl`): a Ray cluster (local, or the one `ray job submit` runs in), the
TransferQueue, the dispatcher and weight store, the learner group (rl/learner.py: W ranks
in one process group, placed together), the rollout and scoring workers; the warm start;
progress (reward, throughput, staleness, queue depth, SP groups) as it trains, metrics to
JSON lines; a rollout worker that dies is started again and its unfinished groups are
handed out again.

    sync        generate the whole step's batch, then train on it (the baseline)
    async k     rollout runs ahead of training by at most k policy versions, and the learner
                streams micro-batches as soon as whole groups are ready
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray
import torch

from pliant.runtime.checkpoint import complete_checkpoints
from pliant.runtime.faults import RolloutFaults

from .common import log
from .dispatch import Dispatcher
from .weights import WeightStore, pack_state
from .learner import learner_capacity
from .learner_group import LearnerGroup, start_learners  # noqa: F401 (start_learners: tests build a group)
from .resume import find_resume_point, restore_metrics, run_identity, warm_start_key
from .reward import load_function, load_reward_fn, split_function_path
from .rollout import RolloutWorker
from .rollout_engine import BUILTIN
from .scoring import ReferenceWorker, RewardWorker
from .spec import RLConfigError, RLResourceError
from .task import build_task
from .task_protocol import EVAL_SEED
from .transfer_queue import TransferQueue

from pliant.io import atomic_write_text, strict_dumps

TASKS = ["reward", "reference", "learner"]


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
    learner: dict[str, Any]
    reward_worker: dict[str, Any]
    restarts: int
    dispatcher: dict[str, Any] = field(default_factory=dict)
    eval_reward: dict[str, float] = field(default_factory=dict)  # held-out reward "before" and "after" RL
    resumed_from: int | None = None  # the checkpoint's step a resumed run went on from (its steps are the rest)

    def _steady(self) -> tuple[list[dict[str, Any]], float]:
        """The steps after the first (the first warms every worker up: Ray's first calls,
        torch's first kernels) and the wall time they took, by the learner's clock."""
        if len(self.steps) < 2:
            return self.steps, self.wall_s
        return self.steps[1:], self.steps[-1]["wall"] - self.steps[0]["wall"]

    def group_sizes(self) -> dict[str, int]:
        """SP groups the planner chose over the run: size -> groups that trained samples."""
        total: dict[str, int] = {}
        for s in self.steps:
            for size, n in s.get("group_mix", {}).items():
                total[str(size)] = total.get(str(size), 0) + n
        return dict(sorted(total.items(), key=lambda kv: int(kv[0])))

    def placement(self) -> dict[str, dict[str, int]]:
        """Which samples went where over the run: per SP group size, the samples trained in
        groups of that size, their tokens, the shortest and the longest."""
        total: dict[str, dict[str, int]] = {}
        for s in self.steps:
            for size, d in s.get("placement", {}).items():
                t = total.setdefault(size, {"samples": 0, "tokens": 0, "shortest": d["shortest"], "longest": 0})
                t["samples"] += d["samples"]
                t["tokens"] += d["tokens"]
                t["shortest"] = min(t["shortest"], d["shortest"])
                t["longest"] = max(t["longest"], d["longest"])
        return dict(sorted(total.items(), key=lambda kv: int(kv[0])))

    def learner_step_s(self) -> float | None:
        """The learner's median time per step in forward, backward and the optimizer (not
        waiting for rollouts), over the steps after the first."""
        steps, _ = self._steady()
        times = [s["train_s"] for s in steps if s.get("train_s") is not None]
        return statistics.median(times) if times else None

    @property
    def tokens_per_s(self) -> float:
        steps, wall = self._steady()
        return sum(s["tokens"] for s in steps) / wall

    @property
    def samples_per_s(self) -> float:
        steps, wall = self._steady()
        return sum(s["samples"] for s in steps) / wall

    def summary(self) -> dict[str, Any]:
        # a rollout worker that finished before the learner's last step was idle till then
        roll_idle = [(r["idle_s"] + max(0.0, self.wall_s - r["wall_s"])) / self.wall_s for r in self.rollout]
        return {"mode": self.mode, "staleness": self.staleness, "seed": self.seed, "wall_s": self.wall_s,
                "tokens": self.tokens, "samples": self.samples, "tokens_per_s": self.tokens_per_s,
                "samples_per_s": self.samples_per_s,
                "max_staleness": max((s["max_staleness"] for s in self.steps), default=0),
                "rollout_idle_fraction": sum(roll_idle) / len(roll_idle) if roll_idle else None,
                "learner_idle_fraction": self.learner["idle_fraction"], "restarts": self.restarts,
                "learner_world": self.learner["world"], "group_sizes": self.group_sizes(),
                "placement": self.placement(), "learner_step_s": self.learner_step_s(),
                "learner_train_s": sum(s.get("train_s", 0.0) for s in self._steady()[0]),
                "publish_wait_median_s": statistics.median(w) if (w := [s["publish_wait_s"] for s in self.steps
                                                                        if "publish_wait_s" in s]) else None,
                "task": self.learner.get("task_counts", {}),
                "reward_first": self.steps[0]["reward"], "reward_last": self.steps[-1]["reward"],
                "eval_reward_before": self.eval_reward.get("before"), "eval_reward_after": self.eval_reward.get("after"),
                "resumed_from": self.resumed_from, "learner_restarts": self.learner.get("learner_restarts", 0)}


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
    workers = [("rollout", resources.rollout_workers, resources.rollout),
               ("learner", resources.learner.world, resources.learner),
               ("reference", 1, resources.reference), ("reward", 1, resources.reward)]
    for kind, attr in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
        need = sum(n * getattr(a, attr) for _, n, a in workers)
        if need > have.get(kind, 0.0) + 1e-9:
            asked = ", ".join(f"{name} {n} x {getattr(a, attr):g}" for name, n, a in workers)
            raise RLResourceError(f"resources: the workers ask for {need:g} {kind} ({asked}), but the Ray cluster "
                                  f"has {have.get(kind, 0.0):g}")


def check_side_workers(side: dict, learner_done: list) -> None:
    """The reward and reference workers run until the queue closes (after the last step): one
    that ends before, or fails, would stall the learner; stop the run with its error. (The
    learner's ranks are the LearnerGroup's to watch.)"""
    ready, _ = ray.wait(list(side.values()), num_returns=len(side), timeout=0)
    for name, ref in side.items():
        if ref in ready and not learner_done:
            try:
                ray.get(ref)
            except Exception as e:
                raise RuntimeError(f"the {name} worker failed: {e}") from e
            raise RuntimeError(f"the {name} worker stopped before the last step")


def warm_start(learner, cache: Path | None, key: dict[str, Any]) -> tuple[dict, list[float]]:
    """The supervised warm start on the learner's rank 0, or the cached one made with the same
    `key` (every mode of a seed starts from the same policy); returns the state and the
    supervised losses ([] from the cache). The cache is written atomically."""
    cached = None
    if cache is not None and cache.is_file():
        saved = torch.load(cache)
        if isinstance(saved, dict) and saved.get("key") == key and "state" in saved:
            cached = saved["state"]
        else:
            log(f"warm start cache {cache} was made with other settings: warm-starting again")
    state, losses = ray.get(learner.warm_start.remote(cached))
    if cached is None and cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save({"key": key, "state": state}, tmp)
        tmp.replace(cache)
    return state, losses


def absolute_file(path: str) -> str:
    """`path/to/file.py:function` made absolute from this directory (workers run elsewhere);
    `module:function` as it is."""
    target, name, is_file = split_function_path(path)
    return f"{Path(target).resolve()}:{name}" if is_file else path


def checked_functions(cfg):
    """The config with its user functions (rl.reward_fn, a rollout engine factory) loaded once
    here, so a bad path or an import error is a clear error before any worker starts, and
    their file paths absolute for the workers."""
    rl = cfg.rl
    load_reward_fn(rl.reward_fn)
    if rl.rollout_engine != BUILTIN:
        load_function(rl.rollout_engine, "rl.rollout_engine")
    update = {"reward_fn": absolute_file(rl.reward_fn), "rollout_engine": absolute_file(rl.rollout_engine)}
    return cfg.model_copy(update={"rl": rl.model_copy(update=update)})


def run(cfg, run_dir: Path, mode: str | None = None, staleness: int | None = None, seed: int | None = None,
        sft_cache: Path | None = None, on_step: Callable[[dict], None] | None = None,
        checkpoints: bool = True, resume: bool = False) -> RunResult:
    """One RL run in `run_dir`; with `checkpoints`, the learner writes RUN/checkpoints/step-N
    (rl.checkpoint_every, and after the last step: what `pliant export` reads). `resume`:
    go on from the newest complete checkpoint there (rl/resume.py)."""
    cfg = checked_functions(cfg)
    rl, res = cfg.rl, cfg.resources
    mode = mode or rl.mode
    k = 0 if mode == "sync" else (rl.staleness if staleness is None else staleness)
    seed = rl.seed if seed is None else seed
    capacity = rl.queue_capacity or (k + 2) * rl.samples_per_step
    if capacity < (k + 1) * rl.samples_per_step:  # steps b..b+k may all be in flight at once
        raise RLConfigError(f"rl.queue_capacity={capacity} cannot hold the {k + 1} steps of {rl.samples_per_step} "
                            f"samples that staleness {k} lets run at once; give at least "
                            f"{(k + 1) * rl.samples_per_step}")
    point = find_resume_point(run_dir, cfg, seed) if resume else None
    if checkpoints and not resume:
        earlier = complete_checkpoints(run_dir / "checkpoints")
        if earlier:
            raise RLConfigError(f"{run_dir / 'checkpoints'} holds an earlier run's checkpoints ({earlier[-1].name} the "
                                f"newest): choose a new --run-dir, go on from it with --resume, or move them away "
                                f"first (a new run would prune them and export would mix the two runs)")
    if checkpoints and rl.checkpoint_every > rl.steps:
        log(f"rl.checkpoint_every={rl.checkpoint_every} is beyond the run's {rl.steps} steps: only the last step "
            f"is checkpointed")
    first = point.version if point else 0
    ensure_ray(res)
    check_resources(res)
    task = build_task(cfg.task, cfg.model, seed, rl.eval_prompts, learner_capacity(cfg))
    run_dir.mkdir(parents=True, exist_ok=True)
    faults = RolloutFaults.from_env(run_dir, log)  # injected faults (PLIANT_FAULT); none: a no-op
    actors: list = []
    group: LearnerGroup | None = None
    metrics = None
    try:
        tq = TransferQueue.create(capacity, TASKS, units=rl.storage_units)
        dispatcher = Dispatcher.remote(task, rl.prompts_per_step, rl.steps, k, first)
        store = WeightStore.remote()
        actors += [tq.controller, *tq.units, dispatcher, store]
        ckpt_dir = str(run_dir.resolve()) if checkpoints else None
        run_meta = {"identity": run_identity(cfg, seed), "metrics_prefix": {"mode": mode, "staleness_bound": k,
                                                                              "seed": seed}}
        group = LearnerGroup(cfg, task, seed, None, mode == "sync", ckpt_dir, run_meta,
                             monitored=cfg.faults.enabled and ckpt_dir is not None)
        group.start()
        learners = group.actors
        state, sft_losses = warm_start(learners[0], sft_cache, warm_start_key(cfg, seed))
        if sft_losses:
            log(f"warm start: {len(sft_losses)} supervised steps, loss {sft_losses[0]:.3f} -> {sft_losses[-1]:.3f}")
        group.state_ref = ray.put(state)
        group.build()
        reference_weights = [ray.put(pack_state(state))]  # the KL's reference: the warm start
        del state
        held_out = task.held_out(rl.eval_prompts) if rl.eval_prompts else []
        scores: dict[str, float] = {}

        def evaluate(when: str) -> None:
            if held_out:
                score = ray.get(group.lead.evaluate.remote(held_out, EVAL_SEED))
                if score is not None:
                    scores[when] = score
                    log(f"held-out reward {when} RL: {score:.3f} ({len(held_out)} prompts)")

        if point is None:
            evaluate("before")
        else:
            ray.get([a.restore.remote(str(point.path), point.world_size) for a in group.actors])
            log(f"resumed from {point.path} (step {point.version}, written by {point.world_size} learner rank(s), "
                f"loaded into {res.learner.world})")
            if point.eval_reward_before is not None:
                scores["before"] = point.eval_reward_before
        run_meta["eval_reward_before"] = scores.get("before")

        def rollout(w: int, incarnation: int = 0):
            return RolloutWorker.options(num_cpus=res.rollout.num_cpus, num_gpus=res.rollout.num_gpus).remote(
                w, cfg.model, rl, task, res.rollout.threads, seed, incarnation)

        reward = RewardWorker.options(num_cpus=res.reward.num_cpus).remote(rl, task, res.reward.threads)
        reference = ReferenceWorker.options(num_cpus=res.reference.num_cpus, num_gpus=res.reference.num_gpus).remote(
            cfg.model, rl, res.reference.threads, seed)
        workers = {w: rollout(w) for w in range(res.rollout_workers)}
        actors += [reward, reference, *workers.values()]
        ray.get([a.__ray_ready__.remote() for a in [reward, reference, *workers.values()]])  # started: the clock begins
        group.run(tq, store)
        runs = {w: a.run.remote(tq, dispatcher, store) for w, a in workers.items()}
        side = {"reward": reward.run.remote(tq), "reference": reference.run.remote(tq, reference_weights)}
        if point is not None:
            restore_metrics(run_dir / "metrics.jsonl", point)
        metrics = (run_dir / "metrics.jsonl").open("a" if point is not None else "w")  # a run directory holds one run
        shown, restarts, learner_restarts, results, last_progress = 0, 0, 0, {}, time.monotonic()
        incarnations = {w: 0 for w in workers}
        while True:
            done, _ = ray.wait([group.refs[0]], timeout=0.5)
            failed = group.failure()
            if failed is not None:
                if learner_restarts >= cfg.faults.max_restarts:
                    raise RuntimeError(f"{failed}; the learner was restarted {learner_restarts} time(s) "
                                       f"(faults.max_restarts)")
                learner_restarts += 1
                log(f"{failed}: restarting the learner group")
                restarted = group.restart(tq, dispatcher, store, rl.steps)
                metrics.close()  # cut back to the checkpoint's steps, with the rows it holds that rank 0 had not
                if restarted is not None:  # yet handed over (their queue statistics were still to come)
                    restore_metrics(run_dir / "metrics.jsonl", restarted)
                else:
                    atomic_write_text(run_dir / "metrics.jsonl", "")
                metrics = (run_dir / "metrics.jsonl").open("a")
                shown, last_progress = 0, time.monotonic()
                continue
            new, writing = group.progress(shown)
            if new:
                last_progress = time.monotonic()
            check_side_workers(side, done)
            if not done and time.monotonic() - last_progress > rl.stall_timeout_s and not writing:
                raise RuntimeError(f"no step trained for {rl.stall_timeout_s:g} s (rl.stall_timeout_s) after step "
                                   f"{shown}: queue {tq.stats()}, dispatcher {ray.get(dispatcher.counts.remote())}")
            for s in new:
                row = {"mode": mode, "staleness_bound": k, "seed": seed, **{x: y for x, y in s.items()
                                                                              if x != "staleness"}}
                metrics.write(strict_dumps(row) + "\n")
                metrics.flush()
                if on_step:
                    on_step(row)
            shown += len(new)
            faults.on_step(shown, workers, incarnations)
            for w, ref in list(runs.items()):
                ready, _ = ray.wait([ref], timeout=0)
                if not ready:
                    continue
                try:
                    results[w] = ray.get(ref)
                    del runs[w]
                except ray.exceptions.RayActorError as e:
                    lost = ray.get(dispatcher.worker_lost.remote((w, incarnations[w])))
                    restarts += 1
                    incarnations[w] += 1
                    log(f"rollout worker {w} died ({type(e).__name__}); restarting it, its groups {lost} go out "
                        f"again")
                    workers[w] = rollout(w, incarnations[w])
                    actors.append(workers[w])
                    runs[w] = workers[w].run.remote(tq, dispatcher, store)
            if done:
                break
        trained = ray.get(group.refs[0])
        ray.get(group.refs[1:])
        wall = trained["wall_s"]  # the learner's clock: from its start to its last step
        evaluate("after")
        tq.close()
        for w, ref in runs.items():
            results[w] = ray.get(ref)
        reward_out, _ = ray.get([side["reward"], side["reference"]])
        counts = ray.get(dispatcher.counts.remote())
        trained["task_counts"] = ray.get(dispatcher.task_counts.remote())
        trained["learner_restarts"] = learner_restarts
    finally:
        if metrics is not None:
            metrics.close()
        if group is not None:
            group.stop()
        for a in actors:
            ray.kill(a)
    steps = trained["steps"]
    return RunResult(mode, k, seed, steps, wall, sum(s["tokens"] for s in steps), sum(s["samples"] for s in steps),
                     [results[w] for w in sorted(results)], {x: trained[x] for x in trained if x != "steps"},
                     reward_out, restarts, counts, scores, first if point else None)
