"""The agent's collective recorder (docs/faults.md): every collective this rank issues, in a
bounded queue of what changed since the last report, with the group, the sequence number
within the group, op, bytes, dtype, shape, enter and exit times, and the peer of
point-to-point transfers.

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
import operator
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from .ops import COLLECTIVES, POINT_TO_POINT, SENDS, signature, signature_id  # noqa: F401 (re-exported)


_P2P = frozenset(POINT_TO_POINT)
# an ended collective's group and its row in the columns (finite: True, False or None unchecked)
_ROW = operator.attrgetter("group", "seq", "sig", "enter", "exit", "step", "finite", "in_checkpoint")
_RECEIVES = frozenset({"recv", "irecv"})  # their tensor is the output: not checked
# the share of calls whose own CPU time the recorder reads (a thread CPU clock is a system call,
# 0.5 us: reading it four times on every call cost a quarter of what it measured); the sum of
# the samples over the share estimates the whole
COST_SAMPLE = 0.125
_draw = random.Random(0x5EED).random


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
    sig: int = 0  # ops.signature_id of (op, dtype, shape)


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


def _tensor_of(value: Any) -> torch.Tensor | None:
    """A tensor argument, or the first of a list of them."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _any_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The first tensor among the arguments (ops whose data argument is absent on this rank,
    such as scatter's list off the source, or that take none)."""
    for value in (*args, *kwargs.values()):
        t = _tensor_of(value)
        if t is not None:
            return t
    return None


_DTYPES: dict[torch.dtype, tuple[str, bool]] = {}  # dtype -> (its name, is it floating point)
_EXACT_SUM = (torch.float32, torch.float64)  # summed in their own type on CPU; others in float32


def _dtype_info(dtype: torch.dtype) -> tuple[str, bool]:
    info = _DTYPES.get(dtype)
    if info is None:
        info = _DTYPES[dtype] = (str(dtype).removeprefix("torch."), dtype.is_floating_point)
    return info


def all_finite(t: torch.Tensor) -> bool | torch.Tensor:
    """Whether every element of `t` is finite, in one reduction: a sum is finite only if every
    element is (an Inf or a NaN makes it Inf or NaN). On CPU, a bool; a non-finite sum (a real
    Inf/NaN, or an overflow) is checked element by element. On CUDA, a 0-dim bool tensor that
    the device fills later (reading it would wait for the device), from a sum in float32 or
    float64, which no finite gradient or activation overflows (3.4e38). isfinite(t).all()
    allocates a bool tensor of t's size and reads t twice: about 10x the time on large tensors."""
    if t.is_cuda:
        return torch.isfinite(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32))
    s = t.sum() if t.dtype in _EXACT_SUM else t.sum(dtype=torch.float32)
    return math.isfinite(s.item()) or bool(torch.isfinite(t).all())


class CollectiveRecorder:
    """Records collectives (at most `capacity` changes between snapshots); thread-safe snapshots."""

    def __init__(self, capacity: int = 4096, check_finite: bool = True):
        # point-to-point transfers entered or ended (on CUDA: started or ended on the device)
        # since the last snapshot, reported as rows: each one at most twice
        self.fresh: deque[CollectiveEvent] = deque(maxlen=2 * capacity)
        # collectives ended since the last snapshot; the snapshot files them into columns per
        # group (seq, signature id, enter, exit, step, finite, in_checkpoint)
        self.ended: deque[CollectiveEvent] = deque(maxlen=4 * capacity)
        self.signatures: dict[int, tuple] = {}  # signature id -> (op, dtype, shape or None)
        self._sig_ids: dict[tuple, int] = {}  # (op, dtype, shape) -> signature id
        self.inflight: dict[tuple[int, ...], CollectiveEvent] = {}
        self.step = 0
        self.step_started = time.monotonic()
        self.in_checkpoint = False
        self.check_finite = check_finite
        self.hook: CollectiveHook | None = None
        self._seq: dict[tuple[int, ...], int] = {}
        self._ranks: dict[int, tuple[int, ...]] = {}
        self._me = -1  # this rank (global), known once a group was looked up
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
        # the wrapper's own CPU time on the calling thread (its arguments, the event, the
        # finiteness check), not the collective's: what the recorder costs training, in
        # nanoseconds, estimated from a random COST_SAMPLE of the calls. A CPU clock, not a
        # wall clock: on a loaded host a wall clock also counts the time the thread is not
        # running (4 ranks on 2 cores: 5x the CPU)
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
        params = tuple(inspect.signature(fn).parameters)  # torch.distributed's calls take named parameters only
        known, count = frozenset(params), len(params)
        p2p = name in POINT_TO_POINT
        asynchronous = p2p and name.startswith("i")

        def position(param: str | None) -> int:
            return params.index(param) if param in params else count  # count: never passed by position

        source = INPUT_ARG.get(name, params[0] if params else None)
        i_input, i_group, i_async = position(source), position("group"), position("async_op")
        peer_param = ("dst" if "dst" in params else "src") if p2p else None
        i_peer = position(peer_param)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            # the arguments this needs, by position or by name (binding every argument, as
            # inspect does, cost the wrapper a third of its time); a call torch will refuse
            # for its arguments' number or names is passed through, for torch to report
            n = len(args)
            if n > count or (kwargs and not known.issuperset(kwargs)):
                return fn(*args, **kwargs)
            timed = _draw() < COST_SAMPLE  # its own CPU time is read on a random share of the calls
            t0 = time.thread_time_ns() if timed else 0
            group = args[i_group] if i_group < n else kwargs.get("group")
            peer = (args[i_peer] if i_peer < n else kwargs.get(peer_param)) if p2p else None
            hook = self.hook
            if hook is not None:  # fault injection: its delays are not the recorder's cost
                hook.before_enter(name, self.group_ranks(group), peer)
                t0 = time.thread_time_ns() if timed else 0
            value = args[i_input] if i_input < n else kwargs.get(source)
            t = _tensor_of(value) if value is not None else None
            if t is None:
                t = _any_tensor(args, kwargs)
            event = self._enter(name, t, group, peer, p2p)
            t1 = time.thread_time_ns() if timed else 0
            if hook is not None:
                hook.after_enter(event)
            out = fn(*args, **kwargs)
            t2 = time.thread_time_ns() if timed else 0
            if asynchronous or (args[i_async] if i_async < n else kwargs.get("async_op")):
                out = _TimedWork(out, lambda: self._exit(event)) if out is not None else out
            else:
                self._exit(event)
            if timed:
                self.own_ns += (t1 - t0 + time.thread_time_ns() - t2) / COST_SAMPLE
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
            if self._me < 0:
                self._me = dist.get_rank()
        return ranks

    def _enter(self, name: str, t: torch.Tensor | None, group_obj: Any, peer: Any, p2p: bool) -> CollectiveEvent:
        group = self._ranks.get(id(group_obj)) or self.group_ranks(group_obj)
        if p2p and peer is not None:
            peer = int(peer)
            group = (self._me, peer) if self._me < peer else (peer, self._me)
        finite = marks = None
        on_device = False
        if t is not None:
            dtype, floating = _dtype_info(t.dtype)
            shape, nbytes, on_device = t.shape, t.nbytes, t.is_cuda  # (a torch.Size is a tuple)
            if floating and self.check_finite and name not in _RECEIVES:
                finite = all_finite(t)  # before the collective spreads a bad value
            if on_device:
                marks = self._start_marks(t.device, finite)
                finite = None  # read from the pinned flag once the device has run the start event
        else:
            dtype, shape, nbytes = "", (), 0
        sid = self._sig_ids.get((name, dtype, shape))
        if sid is None:
            sig = signature(name, dtype, shape)
            sid = self._sig_ids[(name, dtype, shape)] = signature_id(sig)
            self.signatures[sid] = sig
        key = (group, "send" if name in SENDS else "recv") if p2p else group
        seq = self._seq.get(key, 0)
        self._seq[key] = seq + 1
        now = time.monotonic()
        event = CollectiveEvent(group, seq, name, nbytes, dtype, shape, None if on_device else now, None, peer,
                                self.step, finite, self.in_checkpoint, marks, sid)  # by position: half the cost
        if on_device:
            with self._lock:  # the agent thread polls the device's queue
                if not self.pending:
                    self.device_moved = now  # the device's queue was empty: nothing was overdue
                self.pending.append(event)
                if len(self.pending) > self.capacity:  # the device stuck that long: forget the oldest
                    self.pending.popleft()
        elif p2p:
            self.fresh.append(event)
        else:
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
        event.exit = time.monotonic()
        # the agent's snapshot files it: a transfer as a row, a collective into its group's columns
        (self.fresh if event.op in _P2P else self.ended).append(event)
        if self.inflight.get(event.group) is event:
            self.inflight.pop(event.group, None)

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
                if e.op in _P2P:
                    self.fresh.append(e)
            if m.end is not None and m.end.query():
                e.exit = max(e.enter, self.clock.time_of(m.end))
                self.device_moved = now
                (self.fresh if e.op in _P2P else self.ended).append(e)
                continue
            still.append(e)
        self.pending = still

    # ----- step boundaries -----
    def mark_step(self, step: int) -> None:
        self.step, self.step_started = step, time.monotonic()
        if self.clock is not None:
            self.clock.maybe_renew()

    def checkpointing(self, active: bool) -> None:
        """Checkpoint writes are excluded from baselines and alarms."""
        self.in_checkpoint = active

    def snapshot(self) -> dict:
        """What the agent reports: step, in-flight collectives per group, the collectives
        completed since the previous snapshot (per group), and the point-to-point transfers that
        entered or ended (on CUDA: started or ended on the device) since then."""
        with self._lock:
            if self.pending:
                self._poll_device()
            pending = list(self.pending)
        done: dict[tuple[int, ...], list[tuple]] = {}
        for row in map(_ROW, _drain(self.ended)):  # (attrgetter reads the fields in C)
            rows = done.get(row[0])
            if rows is None:
                rows = done[row[0]] = []
            rows.append(row[1:])
        recent = list(dict.fromkeys(_drain(self.fresh)))[-self.capacity:]  # once each, in the order they first changed
        inflight = self.inflight.copy()  # (one C call: the training thread may change it meanwhile)
        for e in pending:  # started on the device, not ended: the oldest of each group
            if e.enter is not None and e.peer is None and e.group not in inflight:
                inflight[e.group] = e
        # CUDA work queued that the device has not finished: a busy host is no progress
        device = [bool(pending), self.device_moved] if self.clock is not None else None
        return {"step": self.step, "step_started": self.step_started, "in_checkpoint": self.in_checkpoint,
                "inflight": inflight, "events": recent, "done": done, "device": device}


def _drain(queue: deque) -> list:
    """Everything in a deque another thread appends to, taken out (each popleft is atomic under the
    GIL: a clear() after a copy would lose what came in between)."""
    out = []
    while True:
        try:
            out.append(queue.popleft())
        except IndexError:
            return out
