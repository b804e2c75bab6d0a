"""The learner's progress board, a Ray actor of its own module: its process imports Ray and
nothing of torch (the learner group's module imports the learner: 4 s of CPU for an actor
that keeps a list)."""
from __future__ import annotations

from typing import Any

import ray


@ray.remote(num_cpus=0, enable_task_events=False)
class ProgressBoard:
    """Rank 0's finished steps and whether it is writing a checkpoint, for the driver to read
    while the learner's one thread trains (one board per learner generation)."""

    def __init__(self):
        self.steps: list[dict[str, Any]] = []
        self.checkpointing = False
        self.written = 0  # the rows the driver has written: it reads the rows after them

    def unwritten(self) -> int | None:
        """The step of the first row the driver has not written yet (None: it has them all). A
        checkpoint carries the rows from there on: the driver polls, and on a fast learner it
        may lag by more than one checkpoint."""
        return self.steps[self.written]["step"] if self.written < len(self.steps) else None

    def add(self, row: dict[str, Any]) -> None:
        self.steps.append(row)

    def writing(self, active: bool) -> None:
        self.checkpointing = active

    def read(self, since: int) -> tuple[list[dict[str, Any]], bool]:
        """The steps after the first `since` (the driver has written those), and whether a
        checkpoint write is under way."""
        self.written = max(self.written, since)
        return self.steps[since:], self.checkpointing
