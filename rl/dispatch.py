"""Admission control: the dispatcher, the small actor every rollout worker asks for work.

`Dispatcher` hands out prompt groups in order. Group g belongs to step b = g // prompts_per_step
and is trained at policy version b; a rollout worker holding weights of version v may start
it only when b - v <= staleness (so no sample is more than k versions old when trained;
k = 0: every sample of step b comes from version b). It remembers which groups each worker
holds, so the groups of a worker that died are handed out again, and counts each group
written once.

A restarted learner group (docs/faults.md, "The RL learner") starts a new *generation*: the
dispatcher rewinds to the checkpoint's first group and admits only workers holding that
generation's weights, and every group's queue partition is per (generation, step)
(`partition_of`), so what was generated for a lost generation is never trained.

The weights the workers generate with travel through rl/weights.py's `WeightStore`.
"""
from __future__ import annotations

from collections import deque
from typing import Any

import ray

from .task_protocol import Prompt

GENERATION_STRIDE = 1 << 32  # partitions per learner generation (steps of a run stay below it)


def partition_of(generation: int, step: int) -> int:
    """The queue partition of `step`'s groups in learner generation `generation`."""
    return generation * GENERATION_STRIDE + step


@ray.remote(num_cpus=0, enable_task_events=False)
class Dispatcher:
    def __init__(self, task, prompts_per_step: int, steps: int, staleness: int, first_step: int = 0):
        """`first_step`: a resumed run's (its groups before were trained): the task's stream
        is drawn up to there, so group g is the same prompt as in a run from step 0."""
        self.task, self.per_step, self.steps, self.k = task, prompts_per_step, steps, staleness
        self.generation = 0
        self.first_step = first_step  # of this generation
        self.next_group = first_step * prompts_per_step
        if self.next_group:
            task.prompts(self.next_group)
        self.discarded = 0  # groups handed out, written or reported for a generation that was lost
        self.prompts: dict[int, Prompt] = {}
        self.held: dict[Any, dict[int, int]] = {}  # worker (index, incarnation) -> {group: step}
        self.again: deque[tuple[int, int]] = deque()  # (group, step) of dead workers, first out
        self.written: dict[int, int] = {}  # group -> times written (must end at 1)
        self.late: dict[int, int] = {}  # group -> copies generated again but not written (its step was trained)

    def next(self, worker: Any, weights: tuple[int, int], written: list = (), late: list = ()) -> dict[str, Any]:
        """{"group", "step", "partition", "generation", "prompt"} to start, {"wait": (g, v)}
        (weights of generation g, version v at least, needed), or {"done": True}. `weights`:
        the worker's (generation, version). `written`, `late`: this worker's reports since its
        last call, (group, generation) pairs (see written_groups), sent with the next ask
        instead of a call of their own."""
        self.written_groups(worker, written, late)
        gen, version = weights
        if gen < self.generation:  # weights of a lost generation: nothing starts on them
            return {"wait": (self.generation, self.first_step)}
        if self.again:
            group, step = self.again[0]
            if step - version > self.k:
                return {"wait": (self.generation, step - self.k)}
            self.again.popleft()
            return self._give(worker, group, step)
        group = self.next_group
        step = group // self.per_step
        if step >= self.steps:
            return {"done": True}
        if step - version > self.k:
            return {"wait": (self.generation, step - self.k)}
        self.next_group += 1
        if group not in self.prompts:  # a rewound group keeps its prompt
            self.prompts[group] = self.task.prompts(1)[0]
        return self._give(worker, group, step)

    def _give(self, worker: Any, group: int, step: int) -> dict[str, Any]:
        self.held.setdefault(worker, {})[group] = step
        return {"group": group, "step": step, "partition": partition_of(self.generation, step),
                "generation": self.generation, "prompt": self.prompts[group]}

    def written_groups(self, worker: Any, groups: list = (), late: list = ()) -> None:
        """(group, generation) pairs: groups whose data is in the queue (a group reported
        before its write landed would be lost with a worker that dies mid-write), and `late`
        ones: handed out again after a worker died, but the first worker's write had landed
        and been trained (not written). Reports of a lost generation are only counted."""
        held = self.held.get(worker, {})
        for group, gen in groups:
            if gen != self.generation:
                self.discarded += 1
                continue
            held.pop(group, None)
            self.written[group] = self.written.get(group, 0) + 1
        for group, gen in late:
            if gen != self.generation:
                self.discarded += 1
                continue
            held.pop(group, None)
            self.late[group] = self.late.get(group, 0) + 1

    def rewind(self, first_step: int, generation: int) -> dict[str, int]:
        """A restarted learner goes on from `first_step` (its checkpoint) as `generation`:
        every group from that step on is forgotten (held, written, waiting to go out again)
        and handed out again in order, to workers holding the new generation's weights."""
        first = first_step * self.per_step
        forgotten = sum(1 for h in self.held.values() for g in h if g >= first)
        forgotten += sum(1 for g in self.written if g >= first)
        self.held = {w: {g: s for g, s in h.items() if g < first} for w, h in self.held.items()}
        self.again = deque((g, s) for g, s in self.again if g < first)
        self.written = {g: n for g, n in self.written.items() if g < first}
        self.late = {g: n for g, n in self.late.items() if g < first}
        self.generation, self.first_step, self.next_group = generation, first_step, first
        self.discarded += forgotten
        return {"next_group": first, "forgotten": forgotten}

    def worker_lost(self, worker: Any) -> list[int]:
        """Hand the groups a dead worker held out again (before any new group)."""
        lost = sorted(self.held.pop(worker, {}).items())
        self.again.extendleft(reversed(lost))
        return [g for g, _ in lost]

    def task_counts(self) -> dict[str, Any]:
        """The task's own counts (e.g. overlong prompts skipped)."""
        return self.task.counts()

    def counts(self) -> dict[str, Any]:
        return {"handed_out": self.next_group, "written": dict(self.written), "late": dict(self.late),
                "held": {w: sorted(h) for w, h in self.held.items()}, "again": list(self.again),
                "generation": self.generation, "discarded": self.discarded}
