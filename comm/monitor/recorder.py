"""The agent's collective recorder (docs/faults.md): every collective this rank issues, in a
bounded ring buffer, with the group, the sequence number within the group, op, bytes,
dtype, shape, enter and exit times, and the peer of point-to-point transfers.

It wraps the `torch.distributed` functions in place, so it sees the comm layer's
collectives and every library that calls them through the module, DeepSpeed's gradient
reductions included. Install it before DeepSpeed starts (DeepSpeed binds a few functions
at initialisation). Asynchronous collectives exit when their work is waited on.

On CUDA a collective call returns once it is queued, so host times would say nothing of
when it ran: a collective on CUDA tensors is timed by CUDA events recorded around it on the
caller's stream, read (without blocking) by the agent thread and mapped onto the host clock
by `DeviceClock`. Such a collective has entered when its start event ran on the device (a
rank whose device is stuck in compute has not entered the next collective, however far its
host ran ahead) and exited when its end event ran; its finiteness flag travels to pinned
host memory behind the start event, so reading it never waits for the device.
"""
from __future__ import annotations

import functools
import inspect
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from .ops import COLLECTIVES, POINT_TO_POINT, SENDS  # noqa: F401 (re-exported)


class CollectiveHook:
    """Called around every recorded collective (fault injection uses it): `before_enter` runs
    before the collective is recorded, `after_enter` after it is recorded and before it runs."""

    def before_enter(self, op: str, group: tuple[int, ...], peer: int | None) -> None: ...

    def after_enter(self, event: "CollectiveEvent") -> None: ...


@dataclass(slots=True, eq=False)  # eq=False: hashed by identity (a snapshot dedupes them)
class CollectiveEvent:
    group: tuple[int, ...]  # global ranks of the process group
    seq: int  # sequence number within the group: the same on every member for the same collective
    op: str
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    enter: float | None  # time.monotonic(); on CUDA None until the device starts it
    exit: float | None = None  # None while in flight
    peer: int | None = None  # point-to-point: the other rank (global)
    step: int = 0  # the training step it was issued in
    finite: Any = None  # a 0-d bool tensor: is the floating-point input finite (None: not checked)
    in_checkpoint: bool = False  # issued while a checkpoint was being written
    marks: "DeviceMarks | None" = None  # CUDA collectives: the events timing it on the device


@dataclass(slots=True)
class DeviceMarks:
    start: Any  # torch.cuda.Event recorded before the collective on the caller's stream
    end: Any = None  # recorded after it (after the wait of an async one)
    flag: int | None = None  # slot of its finiteness flag in the recorder's pinned buffer


class DeviceClock:
    """Device event times on the host's time.monotonic(): an anchor event recorded while the
    stream was idle ran at a known host time; later events are timed against it. The anchor
    is renewed at step boundaries where the stream happens to be idle, so the two clocks never
    drift apart for long."""

    renew_s = 30.0

    def __init__(self, device: torch.device):
        self.device = device
        self._lock = threading.Lock()  # renewed by the main thread, read by the agent's
        torch.cuda.synchronize(device)
        self._anchor, self._host = self._record()
        self._next: tuple[Any, float] | None = None

    def _record(self) -> tuple[Any, float]:
        ev = torch.cuda.Event(enable_timing=True)
        host = time.monotonic()
        ev.record(torch.cuda.current_stream(self.device))
        return ev, host

    def maybe_renew(self) -> None:
        """Main thread, at a step boundary: a new anchor if the last is old and the stream idle."""
        with self._lock:
            if self._next is None and time.monotonic() - self._host > self.renew_s and \
                    torch.cuda.current_stream(self.device).query():
                self._next = self._record()

    def time_of(self, ev: Any) -> float:
        """The host time a completed event ran at."""
        with self._lock:
            if self._next is not None and self._next[0].query():
                self._anchor, self._host = self._next
                self._next = None
        return self._host + self._anchor.elapsed_time(ev) / 1e3


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


def _first_tensor(arguments: dict[str, Any], op: str = "") -> torch.Tensor | None:
    value = arguments.get(INPUT_ARG.get(op, ""))
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    for value in arguments.values():
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
            return value[0]
    return None


_DTYPE_NAMES: dict[torch.dtype, str] = {}


def _dtype_name(dtype: torch.dtype) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


def all_finite(t: torch.Tensor) -> bool | torch.Tensor:
    """Whether every element of `t` is finite, in one reduction: a sum is finite only if every
    element is (an Inf or a NaN makes it Inf or NaN). On CPU, a bool; a non-finite sum (a real
    Inf/NaN, or an overflow) is checked element by element. On CUDA, a 0-dim bool tensor that
    the device fills later (reading it would wait for the device), from a sum in float32 or
    float64, which no finite gradient or activation overflows (3.4e38). isfinite(t).all()
    allocates a bool tensor of t's size and reads t twice: about 10x the time on large tensors."""
    s = t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
    if t.is_cuda:
        return torch.isfinite(s)
    return math.isfinite(s.item()) or bool(torch.isfinite(t).all())


class CollectiveRecorder:
    """Records collectives into a ring of `capacity` events; thread-safe snapshots."""

    def __init__(self, capacity: int = 4096, check_finite: bool = True):
        self.events: deque[CollectiveEvent] = deque(maxlen=capacity)
        # the events entered, ended or started on the device since the last snapshot: what it
        # reports (a scan of the whole ring per snapshot cost the agent 5 us per event)
        self.fresh: deque[CollectiveEvent] = deque(maxlen=2 * capacity)  # each in it at most twice
        self.inflight: dict[tuple[int, ...], CollectiveEvent] = {}
        self.step = 0
        self.step_started = time.monotonic()
        self.in_checkpoint = False
        self.check_finite = check_finite
        self.hook: CollectiveHook | None = None
        self.step_collectives = 0  # collectives this rank entered since the step began
        self._seq: dict[tuple[int, ...], int] = {}
        self._ranks: dict[int, tuple[int, ...]] = {}
        # re-entrant: torchrun's SIGTERM can land while the training thread holds it, and the
        # handler's goodbye takes a snapshot on that same thread
        self._lock = threading.RLock()
        self._originals: dict[str, Callable] = {}
        self.capacity = capacity
        self.clock: DeviceClock | None = None  # set at the first collective on CUDA tensors
        self.pending: deque[CollectiveEvent] = deque()  # CUDA collectives not yet seen to end
        self.device_moved = time.monotonic()  # when a queued CUDA collective last started or ended
        self._flags: torch.Tensor | None = None  # pinned ring of finiteness flags of CUDA inputs
        self._flag_next = 0
        # the wrapper's own time on the calling thread (binding, the event, the finiteness
        # check), not the collective's: what the recorder costs training, in nanoseconds
        self.own_ns = 0

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
        names = tuple(sig.parameters)  # torch.distributed's calls take named parameters only
        known = frozenset(names)
        required = frozenset(n for n, p in sig.parameters.items() if p.default is inspect.Parameter.empty)
        p2p = name in POINT_TO_POINT

        def bind(args: tuple, kwargs: dict) -> dict[str, Any] | None:
            """The arguments passed, by name (what inspect's bind gives, at a tenth of its cost);
            None for a call torch would refuse (it reports that itself)."""
            if len(args) > len(names) or not known.issuperset(kwargs) or any(k in kwargs for k in names[:len(args)]):
                return None
            arguments = dict(zip(names, args))
            arguments.update(kwargs)
            return arguments if required.issubset(arguments) else None

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter_ns()
            arguments = bind(args, kwargs)
            if arguments is None:
                return fn(*args, **kwargs)  # let torch report the bad call
            hook = self.hook
            if hook is not None:  # fault injection: its delays are not the recorder's cost
                hook.before_enter(name, self.group_ranks(arguments.get("group")), arguments.get(
                    "dst", arguments.get("src")) if p2p else None)
                t0 = time.perf_counter_ns()
            event = self._enter(name, arguments, p2p)
            t1 = time.perf_counter_ns()
            if hook is not None:
                hook.after_enter(event)
            out = fn(*args, **kwargs)
            t2 = time.perf_counter_ns()
            if (p2p and name.startswith("i")) or arguments.get("async_op"):
                out = _TimedWork(out, lambda: self._exit(event)) if out is not None else out
            else:
                self._exit(event)
            self.own_ns += t1 - t0 + time.perf_counter_ns() - t2
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

    def _enter(self, name: str, arguments: dict[str, Any], p2p: bool) -> CollectiveEvent:
        group = self.group_ranks(arguments.get("group"))
        peer = None
        if p2p:
            peer = arguments.get("dst", arguments.get("src"))
            group = tuple(sorted((dist.get_rank(), int(peer)))) if peer is not None else group
        t = _first_tensor(arguments, name)
        nbytes = t.numel() * t.element_size() if t is not None else 0
        on_device = t is not None and t.is_cuda
        finite = None
        marks = None
        if self.check_finite and t is not None and t.is_floating_point() and name not in ("recv", "irecv"):
            finite = all_finite(t)  # before the collective spreads a bad value
        if on_device:
            marks = self._start_marks(t.device, finite)
            finite = None  # read from the pinned flag once the device has run the start event
        with self._lock:
            key = (group, "send" if name in SENDS else "recv") if p2p else group
            seq = self._seq.get(key, 0)
            self._seq[key] = seq + 1
            self.step_collectives += 1
            now = time.monotonic()
            event = CollectiveEvent(group, seq, name, nbytes, _dtype_name(t.dtype) if t is not None else "",
                                    tuple(t.shape) if t is not None else (), None if on_device else now,
                                    peer=peer, step=self.step, finite=finite, in_checkpoint=self.in_checkpoint,
                                    marks=marks)
            self.events.append(event)
            if on_device:
                if not self.pending:
                    self.device_moved = now  # the device's queue was empty: nothing was overdue
                self.pending.append(event)
                if len(self.pending) > self.capacity:  # the device stuck that long: forget the oldest
                    self.pending.popleft()
            else:
                self.fresh.append(event)
                if not p2p:
                    self.inflight[group] = event
        return event

    def _start_marks(self, device: torch.device, finite: torch.Tensor | None) -> DeviceMarks:
        if self.clock is None:
            self.clock = DeviceClock(device)
        marks = DeviceMarks(torch.cuda.Event(enable_timing=True))
        if finite is not None:
            if self._flags is None:
                self._flags = torch.ones(self.capacity, dtype=torch.bool, pin_memory=True)
            marks.flag = self._flag_next
            self._flag_next = (self._flag_next + 1) % self.capacity
            self._flags[marks.flag].copy_(finite, non_blocking=True)
        marks.start.record()
        return marks

    def _exit(self, event: CollectiveEvent) -> None:
        if event.exit is not None:
            return
        if event.marks is not None:
            if event.marks.end is None:  # the device's end of it; the agent thread reads the time
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                event.marks.end = end
            return
        with self._lock:
            event.exit = time.monotonic()
            self.fresh.append(event)
            if self.inflight.get(event.group) is event:
                del self.inflight[event.group]

    def _poll_device(self) -> None:
        """Agent thread, under the lock: the CUDA collectives the device has started or ended
        since the last look (event queries never block)."""
        now = time.monotonic()
        still: deque[CollectiveEvent] = deque()
        for e in self.pending:
            m = e.marks
            if e.enter is None:
                if not m.start.query():
                    still.append(e)
                    continue
                e.enter = self.clock.time_of(m.start)
                if m.flag is not None:
                    e.finite = bool(self._flags[m.flag])
                self.device_moved = now
                self.fresh.append(e)
            if m.end is not None and m.end.query():
                e.exit = max(e.enter, self.clock.time_of(m.end))
                self.device_moved = now
                self.fresh.append(e)
                continue
            still.append(e)
        self.pending = still

    # ----- step boundaries -----
    def mark_step(self, step: int) -> None:
        with self._lock:
            self.step, self.step_started = step, time.monotonic()
            self.step_collectives = 0
        if self.clock is not None:
            self.clock.maybe_renew()

    def checkpointing(self, active: bool) -> None:
        """Checkpoint writes are excluded from baselines and alarms."""
        self.in_checkpoint = active

    def snapshot(self) -> dict:
        """What the agent reports: step, in-flight collectives per group, and the events that
        entered or ended (on CUDA: started or ended on the device) since the previous snapshot."""
        with self._lock:
            if self.pending:
                self._poll_device()
            recent = list(dict.fromkeys(self.fresh))[-self.capacity:]  # once each, in the order they first changed
            self.fresh.clear()
            inflight = {g: e for g, e in self.inflight.items()}
            for e in self.pending:  # started on the device, not ended: the oldest of each group
                if e.enter is not None and e.peer is None and e.group not in inflight:
                    inflight[e.group] = e
            # CUDA work queued that the device has not finished: a busy host is no progress
            device = [bool(self.pending), self.device_moved] if self.clock is not None else None
            return {"step": self.step, "step_started": self.step_started, "in_checkpoint": self.in_checkpoint,
                    "inflight": inflight, "events": recent, "device": device}
