"""Checkpoints that a crash can never leave half-written for a restart to load.

Layout under RUN_DIR/checkpoints/:

    step-00000050/            a complete checkpoint
        <DeepSpeed's files>   model, ZeRO optimizer partitions, LR scheduler (per rank)
        rng-rank{r}.pt        every rank's RNG states
        meta.json             step, model signature, data position, the pending batch and its plan
        COMPLETE              written last; a directory without it is never loaded
        universal/            DeepSpeed's universal form, made on the first load by another
                              world size (a restart without a failed rank), with its own COMPLETE
    step-00000060.tmp/        a write in progress (or interrupted): ignored, removed on the next save

Writing: every rank writes into the .tmp directory, a barrier, then rank 0 writes
meta.json, fsyncs, writes COMPLETE, renames the directory into place (atomic on one
filesystem) and deletes all but the newest `keep` checkpoints.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from pliant.planner.errors import InputError
from pliant.io import atomic_write_text, fsync_dir, strict_dumps

COMPLETE = "COMPLETE"
UNIVERSAL = "universal"


class CheckpointError(InputError, RuntimeError):
    """A checkpoint that cannot be used (incomplete, of another config or world, not
    convertible): bad input, which a restart would meet again."""


def config_differences(there: dict, here: dict, skip: frozenset[str] = frozenset(), prefix: str = "") -> list[str]:
    """Where a checkpoint's recorded config (`there`) and this run's (`here`) disagree, each as
    "KEY=X there, Y here" (nested keys dotted), keys in `skip` left out."""
    out = []
    for key in sorted((set(there) | set(here)) - skip):
        a, b = there.get(key), here.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, prefix=f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}={a!r} there, {b!r} here")
    return out


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def to_universal(path: Path) -> Path:
    """The universal form of a complete checkpoint (DeepSpeed's `ds_to_universal`: ZeRO
    partitions merged per parameter), which loads into any data-parallel size. Converted
    once, beside the checkpoint's files, atomically; in a child process, because the
    converter forks workers and a training rank has threads."""
    out = path / UNIVERSAL
    if (out / COMPLETE).is_file():
        return out
    tmp = path / (UNIVERSAL + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
           "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", "1",
           "--num_merge_workers", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode != 0:
        raise CheckpointError(f"converting {path} to DeepSpeed's universal checkpoint failed (exit {r.returncode}):\n"
                              + (r.stdout + r.stderr)[-3000:])
    (path / "latest_universal").unlink(missing_ok=True)  # the converter's pointer; pliant names the tag itself
    atomic_write_text(tmp / COMPLETE, "universal\n")
    fsync_dir(tmp)
    os.replace(tmp, out)
    fsync_dir(path)
    return out


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under RUN_DIR/checkpoints, oldest first (no process group needed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and not p.name.endswith(".tmp") and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: p.name)


class Checkpointer:
    def __init__(self, run_dir: Path, keep: int, on_stage: Callable[[str], None] | None = None):
        """`on_stage` is told "begin", "written" (this rank's files are down, the checkpoint
        is not complete yet) and "done": the fault monitor leaves checkpoint writes out of
        its alarms, and fault injection can strike in the middle of one."""
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.rank = dist.get_rank()
        self.on_stage = on_stage or (lambda stage: None)

    @staticmethod
    def name(step: int) -> str:
        return f"step-{step:08d}"

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return complete_checkpoints(self.root)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, engine, step: int, meta: dict) -> Path:
        self.on_stage("begin")
        try:
            return self._save(engine, step, meta)
        finally:
            self.on_stage("done")

    def _save(self, engine, step: int, meta: dict) -> Path:
        final = self.root / self.name(step)
        tmp_tag = self.name(step) + ".tmp"
        tmp = self.root / tmp_tag
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        dist.barrier()
        engine.save_checkpoint(str(self.root), tag=tmp_tag, save_latest=False)
        torch.save(rng_state(), tmp / f"rng-rank{self.rank}.pt")
        self.on_stage("written")
        dist.barrier()
        if self.rank == 0:
            atomic_write_text(tmp / "meta.json", strict_dumps(meta))
            atomic_write_text(tmp / COMPLETE, f"step {step}\n")
            fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.root)
            self._prune()
        dist.barrier()
        return final

    def _prune(self) -> None:
        for old in self.complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob("*.tmp"):  # interrupted writes
            shutil.rmtree(stale, ignore_errors=True)

    def load(self, engine, path: Path, resize: bool = False, rng_of_rank0: bool = False) -> dict:
        """Load a complete checkpoint; `resize`: it was written by another number of ranks, and
        is loaded through its universal form (converted by rank 0 on first use).
        `rng_of_rank0`: a rank the checkpoint's world did not have takes rank 0's RNG states
        (a job whose ranks draw nothing of their own may grow); else it is an error."""
        if not (path / COMPLETE).is_file():
            raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
        meta = json.loads((path / "meta.json").read_text())
        rng_file = path / f"rng-rank{self.rank}.pt"
        if not rng_file.is_file() and rng_of_rank0:
            rng_file = path / "rng-rank0.pt"
        if not rng_file.is_file():
            raise CheckpointError(f"{path} has no RNG state for rank {self.rank}: it was written by a smaller world "
                                  f"({meta.get('world_size')} ranks); a restart may shrink the world, not grow it")
        if resize:
            self.on_stage("begin")  # the other ranks wait in the barrier: not a hang
            try:
                if self.rank == 0:
                    to_universal(path)
                dist.barrier()
            finally:
                self.on_stage("done")
            engine._config.load_universal_checkpoint = True  # read at every load; this load only
            try:
                engine.load_checkpoint(str(path), tag=UNIVERSAL, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
            finally:
                engine._config.load_universal_checkpoint = False
        else:
            engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                   load_lr_scheduler_states=True)
        set_rng_state(torch.load(rng_file, weights_only=False))
        return meta
