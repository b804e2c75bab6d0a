"""`pliant rl --resume`: which checkpoint a run goes on from, and whether it may.

An RL checkpoint (written by the learner, rl/learner.py: RUN/checkpoints/step-N in
`pliant train`'s layout, runtime/checkpoint.py) holds the learner's ZeRO state and
optimizer, every rank's RNG states, and in meta.json:

    version             the policy version = the steps trained (N)
    trained_groups      every prompt group trained so far -> the step it was trained at
    identity            what the run's data and reference depend on (run_identity): the model,
                        the task, the seed, the step's shape, the warm-start settings
    eval_reward_before  the held-out reward before RL (not measured again on resume)
    recent_steps        the metrics rows since the checkpoint before, or since the first row the
                        driver had not written yet if that is older (the driver writes rows as it
                        reads them, polling; a fast learner may be more than a checkpoint ahead)

What is not in it, and why it need not be:
- the data order: group g is the (g+1)-th prompt of the task's seeded stream, and every
  group of a step below N was trained before N (a step trains exactly its own groups), so
  the dispatcher goes on from group N * prompts_per_step;
- the reference policy: it is the warm start, cached in RUN/warm_start.pt with the settings
  it was made with (made again, identically, if the file is gone);
- the rollout's RNG: each response draws from a stream of its own (rl/rollout.py:
  sample_seed), so a group's responses depend on its prompt and the weights alone; the
  reference scores a group in a forward of its own, its samples in one order, so its
  log-probs do not depend on the batch it shared either;
- the queue and the samples in flight: generated from weights of steps after N, they are
  gone with the run; their groups are generated again from version N's weights, within the
  staleness bound as any group is.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pliant.io import atomic_write_text, strict_dumps
from pliant.runtime.checkpoint import COMPLETE, complete_checkpoints, config_differences

from .common import log
from .spec import RLConfigError


def warm_start_key(cfg, seed: int) -> dict[str, Any]:
    """What a warm start depends on: a cached one made with anything else is not reused."""
    rl = cfg.rl
    return {"model": cfg.model.model_dump(mode="json"), "task": cfg.task.model_dump(mode="json"), "seed": seed,
            **{name: getattr(rl, name) for name in ("sft_steps", "sft_batch", "sft_lr", "sft_warmup_steps",
                                                    "grad_clip")}}


def run_identity(cfg, seed: int) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it: the warm start (the policy's
    shape and source, the task, the seed: the reference policy and the prompts) and the step's
    shape (which groups belong to a step)."""
    return {**warm_start_key(cfg, seed), "prompts_per_step": cfg.rl.prompts_per_step,
            "group_size": cfg.rl.group_size}


@dataclass(frozen=True)
class ResumePoint:
    path: Path
    version: int  # steps trained
    world_size: int  # learner ranks that wrote it
    meta: dict[str, Any]

    @property
    def eval_reward_before(self) -> float | None:
        return self.meta.get("eval_reward_before")


def find_resume_point(run_dir: Path, cfg, seed: int) -> ResumePoint:
    """The newest complete checkpoint of `run_dir`, checked against this run's config; a clear
    error when there is none, it is torn, it is another run's, or nothing is left to train."""
    root = run_dir / "checkpoints"
    done = complete_checkpoints(root)
    torn = sorted(p.name for p in root.iterdir() if p.is_dir() and not (p / COMPLETE).is_file()) \
        if root.is_dir() else []
    if not done:
        why = f" ({', '.join(torn)}: no {COMPLETE} marker, an interrupted write, never loaded)" if torn else ""
        raise RLConfigError(f"--resume: {root} holds no complete checkpoint{why}; run without --resume to start "
                            f"the run")
    path = done[-1]
    newer_torn = [t for t in torn if t.removesuffix(".tmp") > path.name]
    if newer_torn:
        log(f"--resume: {', '.join(newer_torn)} has no {COMPLETE} marker (an interrupted write): going on from "
            f"{path.name}, the newest complete one")
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RLConfigError(f"--resume: {path / 'meta.json'} cannot be read: {e}") from None
    if meta.get("run") != "rl":
        raise RLConfigError(f"--resume: {path} is a `pliant train` checkpoint, not an RL run's (meta.json has no "
                            f"run: rl); `pliant train --resume` goes on from it")
    diff = config_differences(meta.get("identity", {}), run_identity(cfg, seed))
    if diff:
        raise RLConfigError(f"--resume: {path} is of another run: {'; '.join(diff)}")
    version = int(meta["version"])
    if version >= cfg.rl.steps:
        raise RLConfigError(f"--resume: {path.name} is at step {version} and rl.steps={cfg.rl.steps}: nothing is left "
                            f"to train (give more --steps to go on)")
    return ResumePoint(path, version, int(meta["world_size"]), meta)


def restore_metrics(metrics: Path, point: ResumePoint) -> list[dict[str, Any]]:
    """RUN/metrics.jsonl as of the checkpoint, rewritten atomically before the resumed run
    appends: the rows of the steps it holds (rows after it were trained by weights that are
    gone, and are trained again), with the rows of its meta.json that the file lacks (the
    driver had not written them yet, as it writes a row).
    Returns the rows kept, in step order."""
    rows: dict[int, dict[str, Any]] = {}
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
                step = row["step"]
            except (json.JSONDecodeError, KeyError, TypeError):  # a line the killed run was writing
                continue
            if step < point.version:
                rows[step] = row
    for row in point.meta.get("recent_steps", []):
        if row["step"] not in rows:
            rows[row["step"]] = {**point.meta.get("metrics_prefix", {}), **row}
    kept = [rows[s] for s in sorted(rows)]
    atomic_write_text(metrics, "".join(strict_dumps(r) + "\n" for r in kept))
    return kept
