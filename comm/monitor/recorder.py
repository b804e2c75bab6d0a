"""The agent's collective recorder (docs/faults.md): every collective this rank issues, in a
bounded ring buffer, with the group, the sequence number within the group, op, bytes,
dtype, shape, enter and exit times, and the peer of point-to-point transfers.

It wraps the `torch.distributed` functions in place, so it sees the comm layer's
collectives and every library that calls them through the module, DeepSpeed's gradient
reductions included. Install it before DeepSpeed starts (DeepSpeed binds a few functions
at initialisation). Asynchronous collectives exit when their work is waited on.
"""
from __future__ import annotations

import functools
import inspect
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single",
               "all_to_all", "broadcast", "reduce", "barrier", "all_gather_object", "broadcast_object_list",
               "gather", "scatter", "reduce_scatter")
POINT_TO_POINT = ("send", "recv", "isend", "irecv")
SENDS = ("send", "isend")  # point-to-point sequence numbers count sends and receives of a pair apart


class CollectiveHook:
    """Called around every recorded collective (fault injection uses it): `before_enter` runs
    before the collective is recorded, `after_enter` after it is recorded and before it runs."""

    def before_enter(self, op: str, group: tuple[int, ...], peer: int | None) -> None: ...

    def after_enter(self, event: "CollectiveEvent") -> None: ...


@dataclass
class CollectiveEvent:
    group: tuple[int, ...]  # global ranks of the process group
    seq: int  # sequence number within the group: the same on every member for the same collective
    op: str
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    enter: float  # time.monotonic()
    exit: float | None = None  # None while in flight
    peer: int | None = None  # point-to-point: the other rank (global)
    step: int = 0  # the training step it was issued in
    finite: Any = None  # a 0-d bool tensor: is the floating-point input finite (None: not checked)
    in_checkpoint: bool = False  # issued while a checkpoint was being written


class _TimedWork:
    """An async collective's work handle that records the exit when it is waited on."""

    def __init__(self, work: Any, done: Callable[[], None]):
        self._work, self._done = work, done

    def wait(self, *args, **kwargs):
        out = self._work.wait(*args, **kwargs)
        self._done()
        return out

    def is_completed(self) -> bool:
        finished = self._work.is_completed()
        if finished:
            self._done()
        return finished

    def __getattr__(self, name: str):
        return getattr(self._work, name)


# the argument that carries this rank's data in (the first tensor argument of several ops
# is an output buffer, uninitialised memory)
INPUT_ARG = {"all_gather_into_tensor": "input_tensor", "all_gather": "tensor", "reduce_scatter_tensor": "input",
             "reduce_scatter": "input_list", "all_to_all_single": "input", "all_to_all": "input_tensor_list",
             "scatter": "scatter_list"}


def _first_tensor(bound: inspect.BoundArguments, op: str = "") -> torch.Tensor | None:
    value = bound.arguments.get(INPUT_ARG.get(op, ""))
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    for value in bound.arguments.values():
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
            return value[0]
    return None


class CollectiveRecorder:
    """Records collectives into a ring of `capacity` events; thread-safe snapshots."""

    def __init__(self, capacity: int = 4096, check_finite: bool = True):
        self.events: deque[CollectiveEvent] = deque(maxlen=capacity)
        self.inflight: dict[tuple[int, ...], CollectiveEvent] = {}
        self.step = 0
        self.step_started = time.monotonic()
        self.in_checkpoint = False
        self.check_finite = check_finite
        self.hook: CollectiveHook | None = None
        self.step_collectives = 0  # collectives this rank entered since the step began
        self._seq: dict[tuple[int, ...], int] = {}
        self._ranks: dict[int, tuple[int, ...]] = {}
        self._lock = threading.Lock()
        self._originals: dict[str, Callable] = {}

    # ----- install -----
    def install(self) -> "CollectiveRecorder":
        for name in COLLECTIVES + POINT_TO_POINT:
            fn = getattr(dist, name, None)
            if fn is None or name in self._originals:
                continue
            self._originals[name] = fn
            setattr(dist, name, self._wrap(name, fn))
        return self

    def uninstall(self) -> None:
        for name, fn in self._originals.items():
            setattr(dist, name, fn)
        self._originals.clear()

    def __enter__(self) -> "CollectiveRecorder":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _wrap(self, name: str, fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        p2p = name in POINT_TO_POINT

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                bound = sig.bind(*args, **kwargs)
            except TypeError:
                return fn(*args, **kwargs)  # let torch report the bad call
            hook = self.hook
            if hook is not None:
                hook.before_enter(name, self.group_ranks(bound.arguments.get("group")), bound.arguments.get(
                    "dst", bound.arguments.get("src")) if p2p else None)
            event = self._enter(name, bound, p2p)
            if hook is not None:
                hook.after_enter(event)
            out = fn(*args, **kwargs)
            if (p2p and name.startswith("i")) or bound.arguments.get("async_op"):
                return _TimedWork(out, lambda: self._exit(event)) if out is not None else out
            self._exit(event)
            return out

        return wrapper

    # ----- events -----
    def group_ranks(self, group) -> tuple[int, ...]:
        key = id(group)
        ranks = self._ranks.get(key)
        if ranks is None:
            if group is None or group is dist.GroupMember.WORLD:
                ranks = tuple(range(dist.get_world_size()))
            else:
                ranks = tuple(dist.get_process_group_ranks(group))
            self._ranks[key] = ranks
        return ranks

    def _enter(self, name: str, bound: inspect.BoundArguments, p2p: bool) -> CollectiveEvent:
        group = self.group_ranks(bound.arguments.get("group"))
        peer = None
        if p2p:
            peer = bound.arguments.get("dst", bound.arguments.get("src"))
            group = tuple(sorted((dist.get_rank(), int(peer)))) if peer is not None else group
        t = _first_tensor(bound, name)
        nbytes = t.numel() * t.element_size() if t is not None else 0
        finite = None
        if self.check_finite and t is not None and t.is_floating_point() and name not in ("recv", "irecv"):
            finite = torch.isfinite(t).all()  # before the collective spreads a bad value
        with self._lock:
            key = (group, "send" if name in SENDS else "recv") if p2p else group
            seq = self._seq.get(key, 0)
            self._seq[key] = seq + 1
            self.step_collectives += 1
            event = CollectiveEvent(group, seq, name, nbytes, str(t.dtype).removeprefix("torch.") if t is not None
                                    else "", tuple(t.shape) if t is not None else (), time.monotonic(), peer=peer,
                                    step=self.step, finite=finite, in_checkpoint=self.in_checkpoint)
            self.events.append(event)
            if not p2p:
                self.inflight[group] = event
        return event

    def _exit(self, event: CollectiveEvent) -> None:
        if event.exit is not None:
            return
        with self._lock:
            event.exit = time.monotonic()
            if self.inflight.get(event.group) is event:
                del self.inflight[event.group]

    # ----- step boundaries -----
    def mark_step(self, step: int) -> None:
        with self._lock:
            self.step, self.step_started = step, time.monotonic()
            self.step_collectives = 0

    def checkpointing(self, active: bool) -> None:
        """Checkpoint writes are excluded from baselines and alarms."""
        self.in_checkpoint = active

    def snapshot(self, since: float = float("-inf")) -> dict:
        """What the agent reports: step, in-flight collectives per group, and the events that
        completed (or started) after `since`; `taken` is the `since` of the next snapshot."""
        with self._lock:
            taken = time.monotonic()
            recent = [e for e in self.events if e.enter >= since or (e.exit is not None and e.exit >= since)]
            inflight = {g: e for g, e in self.inflight.items()}
            return {"step": self.step, "step_started": self.step_started, "in_checkpoint": self.in_checkpoint,
                    "inflight": inflight, "events": recent, "taken": taken}
