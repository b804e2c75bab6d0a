"""Admission control and versioned weights: the two small actors every RL worker talks to.

`Dispatcher` hands out prompt groups in order. Group g belongs to step b = g // prompts_per_step
and is trained at policy version b; a rollout worker holding weights of version v may start
it only when b - v <= staleness (so no sample is more than k versions old when trained;
k = 0: every sample of step b comes from version b). It remembers which groups each worker
holds, so the groups of a worker that died are handed out again, and counts each group
written once.

`WeightStore` keeps the newest published weights (a Ray object reference) with their
version; rollout workers poll it between decode steps and wait on it when admission says
their weights are too old. Weights travel packed in one byte array (`pack_weights`): Ray
hands a numpy array to its readers straight from the object store, where a dict of tensors
is unpickled tensor by tensor (publish to loaded: 11 ms here against 21-24 ms).
"""
from __future__ import annotations

import asyncio
import warnings
from collections import deque
from typing import Any

import numpy as np
import ray
import torch

from .task_protocol import Prompt


@ray.remote(num_cpus=0, enable_task_events=False)
class Dispatcher:
    def __init__(self, task, prompts_per_step: int, steps: int, staleness: int, first_step: int = 0):
        """`first_step`: a resumed run's (its groups before were trained): the task's stream
        is drawn up to there, so group g is the same prompt as in a run from step 0."""
        self.task, self.per_step, self.steps, self.k = task, prompts_per_step, steps, staleness
        self.next_group = first_step * prompts_per_step
        if self.next_group:
            task.prompts(self.next_group)
        self.prompts: dict[int, Prompt] = {}
        self.held: dict[Any, dict[int, int]] = {}  # worker (index, incarnation) -> {group: step}
        self.again: deque[tuple[int, int]] = deque()  # (group, step) of dead workers, first out
        self.written: dict[int, int] = {}  # group -> times written (must end at 1)
        self.late: dict[int, int] = {}  # group -> copies generated again but not written (its step was trained)

    def next(self, worker: Any, version: int, written: list[int] = (), late: list[int] = ()) -> dict[str, Any]:
        """{"group", "step", "prompt"} to start, {"wait": v} (weights of version v needed), or
        {"done": True}. `written`, `late`: this worker's reports since its last call (see
        written_groups), sent with the next ask instead of a call of their own."""
        self.written_groups(worker, written, late)
        if self.again:
            group, step = self.again[0]
            if step - version > self.k:
                return {"wait": step - self.k}
            self.again.popleft()
            return self._give(worker, group, step)
        group = self.next_group
        step = group // self.per_step
        if step >= self.steps:
            return {"done": True}
        if step - version > self.k:
            return {"wait": step - self.k}
        self.next_group += 1
        self.prompts[group] = self.task.prompts(1)[0]
        return self._give(worker, group, step)

    def _give(self, worker: Any, group: int, step: int) -> dict[str, Any]:
        self.held.setdefault(worker, {})[group] = step
        return {"group": group, "step": step, "prompt": self.prompts[group]}

    def written_groups(self, worker: Any, groups: list[int], late: list[int] = ()) -> None:
        """Groups whose data is in the queue (a group reported before its write landed would
        be lost with a worker that dies mid-write), and `late` ones: handed out again after a
        worker died, but the first worker's write had landed and been trained (not written)."""
        held = self.held.get(worker, {})
        for group in groups:
            held.pop(group, None)
            self.written[group] = self.written.get(group, 0) + 1
        for group in late:
            held.pop(group, None)
            self.late[group] = self.late.get(group, 0) + 1

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
                "held": {w: sorted(h) for w, h in self.held.items()}, "again": list(self.again)}


ALIGN = 8  # bytes: every tensor starts at a multiple, so its bytes view as its dtype


def _padded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def pack_weights(model: torch.nn.Module) -> np.ndarray:
    """The model's state (parameters and buffers, in state_dict order) as one byte array."""
    return pack_state(model.state_dict())


def pack_state(state: dict[str, torch.Tensor]) -> np.ndarray:
    """A state dict (in a model's state_dict order) as one byte array (pack_weights)."""
    parts = []
    for t in state.values():
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8).cpu()
        parts += [raw, torch.zeros(_padded(len(raw)) - len(raw), dtype=torch.uint8)]
    return torch.cat(parts).numpy()


def load_weights(model: torch.nn.Module, packed: np.ndarray) -> None:
    """Copy packed weights (pack_weights of a model of the same spec) into `model`, on its device."""
    with warnings.catch_warnings():  # the object store's array is read-only: it is only read here
        warnings.simplefilter("ignore", UserWarning)
        data = torch.from_numpy(packed)
    state = model.state_dict()
    need = sum(_padded(t.numel() * t.element_size()) for t in state.values())
    if need != data.numel():
        raise ValueError(f"packed weights have {data.numel()} bytes, the model's state needs {need}")
    off = 0
    with torch.no_grad():
        for t in state.values():
            n = t.numel() * t.element_size()
            t.copy_(data[off:off + n].view(t.dtype).view(t.shape))
            off += _padded(n)


@ray.remote(num_cpus=0, enable_task_events=False)
class WeightStore:
    def __init__(self):
        self.version = -1
        self.ref: list = []  # [ObjectRef] (wrapped, so Ray hands the reference, not the value)
        self.changed = asyncio.Condition()

    async def publish(self, version: int, wrapped: list) -> None:
        async with self.changed:
            if version > self.version:  # the learner does not wait for a publish: they may overtake
                self.version, self.ref = version, wrapped
                self.changed.notify_all()

    async def latest(self, newer_than: int = -1, timeout: float | None = None) -> tuple[int, list]:
        """(version, [ref]) once a version above `newer_than` exists (or at the timeout:
        whatever is there)."""
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(lambda: self.version > newer_than), timeout)
            except asyncio.TimeoutError:
                pass
            return self.version, self.ref
