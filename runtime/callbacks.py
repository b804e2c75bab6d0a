"""The extras of a training run, attached to `Trainer.train()` as callbacks (torchtitan keeps
them out of the step the same way): metrics (JSON lines, TensorBoard), checkpoints, progress,
and the final parameters. The fault monitor (runtime/monitoring.py) and fault-injection test
hooks (runtime/faults.py) are callbacks too.

A callback sees the trainer at the start, before and after every step, and at the end (with
the exception that ended the run, or None).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pliant.io import atomic_write_bytes, strict_dumps

if TYPE_CHECKING:
    from .checkpoint import Checkpointer
    from .trainer import StepResult, Trainer


class Callback:
    def on_train_start(self, trainer: "Trainer") -> None: ...

    def on_step_start(self, trainer: "Trainer", step: int) -> None: ...

    def on_step_end(self, trainer: "Trainer", result: "StepResult") -> None: ...

    def on_train_end(self, trainer: "Trainer", error: BaseException | None) -> None: ...


class JsonlMetrics(Callback):
    """RUN_DIR/metrics.jsonl: one JSON line per step (rank 0), flushed at once so a crash
    loses at most the step in flight."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None

    def on_train_start(self, trainer: "Trainer") -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")

    def on_step_end(self, trainer: "Trainer", result: "StepResult") -> None:
        self._file.write(strict_dumps({**vars(result), "wall": time.time()}) + "\n")
        self._file.flush()

    def on_train_end(self, trainer: "Trainer", error: BaseException | None) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class StartupClock(Callback):
    """RUN_DIR/startup-a{attempt}.json (rank 0): where this start of the job spent its time
    before its first step ended, as wall-clock marks (seconds since the epoch): the process
    started, its imports done, the trainer built (process group, planner, model, DeepSpeed),
    the checkpoint loaded, the first step done. `pliant bench startup` reads it."""

    def __init__(self, run_dir: Path, attempt: int, marks: dict[str, float]):
        self.path = Path(run_dir) / f"startup-a{attempt}.json"
        self.marks = dict(marks)

    def on_train_start(self, trainer: "Trainer") -> None:
        self.marks["train_start"] = time.time()

    def on_step_end(self, trainer: "Trainer", result: "StepResult") -> None:
        if "first_step" in self.marks:
            return
        self.marks["first_step"] = time.time()
        atomic_write_bytes(self.path, strict_dumps(self.marks, indent=1).encode())


class CalibrationLog(Callback):
    """RUN_DIR/calibration.jsonl: one JSON line per refit of the cost model (rank 0): the
    coefficients before and after, the window's prediction error both ways, what the bounds
    held back (planner/calibrate.py)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "calibration.jsonl"

    def on_step_end(self, trainer: "Trainer", result: "StepResult") -> None:
        refit = trainer.last_refit
        if refit is not None and refit.step == result.step:
            with open(self.path, "a") as f:
                f.write(strict_dumps(refit.to_dict()) + "\n")


class TensorBoardMetrics(Callback):
    """TensorBoard event files in RUN_DIR/tensorboard (rank 0): loss, learning rate, step time
    measured and predicted, tokens/s, peak memory, group mix."""

    def __init__(self, run_dir: Path):
        self.log_dir = Path(run_dir) / "tensorboard"
        self._writer = None

    def on_train_start(self, trainer: "Trainer") -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # tensorboard is an install requirement; a broken env says so
            raise RuntimeError(f"train.tensorboard needs the tensorboard package ({e})") from None
        self._writer = SummaryWriter(str(self.log_dir))

    def on_step_end(self, trainer: "Trainer", r: "StepResult") -> None:
        w, s = self._writer, r.step
        w.add_scalar("train/loss", r.loss, s)
        w.add_scalar("train/lr", r.lr, s)
        w.add_scalar("time/step_s", r.seconds, s)
        w.add_scalar("time/predicted_step_s", r.predicted_s, s)
        w.add_scalar("throughput/tokens_per_s", r.tokens / r.seconds if r.seconds > 0 else 0.0, s)
        w.add_scalar("memory/peak_gib", r.memory_bytes / 2**30, s)
        w.add_scalar("plan/micro_batches", r.micro_batches, s)
        w.add_scalars("plan/groups_by_size", {str(k): v for k, v in r.group_mix.items()}, s)
        w.flush()

    def on_train_end(self, trainer: "Trainer", error: BaseException | None) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class Checkpointing(Callback):
    """A complete checkpoint every `every` steps and after the last one (every rank takes part)."""

    def __init__(self, checkpointer: "Checkpointer", every: int):
        self.checkpointer, self.every = checkpointer, every

    def on_step_end(self, trainer: "Trainer", r: "StepResult") -> None:
        if r.step % self.every == 0 or r.step == trainer.train_spec.steps:
            trainer.save_checkpoint(self.checkpointer)


class ProgressPrinter(Callback):
    """A progress bar on a terminal; a line every few steps in logs (rank 0)."""

    def __init__(self):
        self.live = sys.stderr.isatty()
        self._bar = None

    def on_train_start(self, trainer: "Trainer") -> None:
        from pliant.comm import kernel_names

        self.total = trainer.train_spec.steps
        self.every = max(1, self.total // 20)
        kernels = kernel_names(torch.empty(0, 1, 1, device=trainer.device, dtype=trainer.dtype))
        print(f"attention kernels ({trainer.device.type}, {str(trainer.dtype).removeprefix('torch.')}): "
              f"linear {kernels['linear']}, softmax {kernels['softmax']}", flush=True)
        if self.live:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

            self._bar = Bar(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            TextColumn("{task.description}"), console=Console(stderr=True))
            self._task = self._bar.add_task("", total=self.total, completed=trainer.step_no)
            self._bar.start()

    def on_step_end(self, trainer: "Trainer", r: "StepResult") -> None:
        mix = " ".join(f"{n}x{s}" for s, n in sorted(r.group_mix.items()))
        text = (f"loss {r.loss:.4f}  step {r.seconds:.2f}s (predicted {r.predicted_s:.2f}s)  groups {mix}  "
                f"micro-batches {r.micro_batches}")
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=text)
        elif r.step % self.every == 0 or r.step == self.total or r.step == 1:
            print(f"step {r.step}/{self.total}  {text}", flush=True)

    def on_train_end(self, trainer: "Trainer", error: BaseException | None) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


class FinalParameters(Callback):
    """RUN_DIR/final_params.pt: every parameter flattened, after a run that ended normally (rank 0)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "final_params.pt"

    def on_train_end(self, trainer: "Trainer", error: BaseException | None) -> None:
        if error is None:
            import io

            buf = io.BytesIO()
            torch.save(trainer.parameters_vector(), buf)
            atomic_write_bytes(self.path, buf.getvalue())


def standard_callbacks(trainer: "Trainer", run_dir: Path | None, checkpointer: "Checkpointer | None" = None,
                       save_params: bool = False, after_checkpoint: list | None = None,
                       startup: tuple[int, dict[str, float]] | None = None) -> list[Callback]:
    """What `pliant train` attaches, in order: checkpoints on every rank when there is a run
    directory, then `after_checkpoint` (fault-injection hooks), then metrics (and TensorBoard
    when train.tensorboard), final parameters, the start-up marks (`startup`: this start's
    number and its marks so far) and progress on rank 0."""
    out: list[Callback] = []
    if checkpointer is not None:
        out.append(Checkpointing(checkpointer, trainer.train_spec.checkpoint_every))
    out.extend(after_checkpoint or [])
    if trainer.rank == 0:
        if run_dir is not None:
            out.append(JsonlMetrics(run_dir))
            if trainer.calibration is not None:
                out.append(CalibrationLog(run_dir))
            if trainer.train_spec.tensorboard:
                out.append(TensorBoardMetrics(run_dir))
            if save_params:
                out.append(FinalParameters(run_dir))
            if startup is not None:
                out.append(StartupClock(run_dir, *startup))
        out.append(ProgressPrinter())
    return out
