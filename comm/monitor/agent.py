"""The agent in every rank (docs/faults.md): a thread that sends the recorder's summaries to
the master over pyzmq every `report_interval_s`, with the evidence that the rank's main
thread makes progress (progress.py: its CPU time, its read/write bytes, its Python stack).
A summary doubles as the heartbeat: a rank that is frozen or holds the GIL sends nothing,
and the master then looks at it from outside.

The socket is a DEALER: the master acknowledges each summary with its own clock, which
gives the offset between this rank's monotonic clock and the master's (NTP style, the
sample with the shortest round trip of the last 64 wins; acknowledgements are read the
moment they arrive, so the round trip is the network's, not the report interval's). With no acknowledgement for
`master_timeout_s` the agent warns once that the master is gone and training goes on
unmonitored: losing the monitor never stops or hangs the job.

A rank stopped by SIGTERM (torchrun stopping the peers of a failed rank) says so before it
goes, even while its main thread is blocked in a collective: CPython's C-level signal
handler writes the signal number to a wakeup socket the agent thread listens on. A crashed
rank never says goodbye; that is how the master tells the culprit from its peers.
"""
from __future__ import annotations

import atexit
import math
import os
import signal
import socket
import sys
import threading
import time
from array import array
from collections import deque
from typing import Any

import zmq

from . import wire
from .progress import TICK, MainThreadProbe, stat_fields
from .recorder import CollectiveEvent, CollectiveRecorder
from .spec import FaultSpec

NODE_ENV = "PLIANT_NODE"  # the node (index in cluster.hosts) a rank runs on, set by its node's supervisor


def threads_cpu(prefix: str) -> float:
    """CPU seconds of this process's threads whose name starts with `prefix` (/proc)."""
    total = 0
    for task in os.scandir("/proc/self/task"):
        try:
            with open(f"{task.path}/comm") as f:
                if not f.read().startswith(prefix):
                    continue
        except OSError:
            continue
        fields = stat_fields(f"{task.path}/stat")
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


def done_block(group: tuple[int, ...], columns: list[tuple]) -> list:
    """A group's completed collectives (`columns`: the snapshot's rows of the group transposed)
    as packed arrays in this machine's byte order (little-endian everywhere pliant runs):
    [group, seq, signature id, enter, exit, step, finite (1, 0, -1 unchecked; given as True,
    False, None), in_checkpoint]; times on the rank's clock (the report carries the offset to
    the master's)."""
    seq, sig, enter, exit_, step, finite, ckpt = columns
    finite = [-1 if f is None else 1 if f else 0 for f in finite]
    return [list(group), array("q", seq).tobytes(), array("q", sig).tobytes(), array("d", enter).tobytes(),
            array("d", exit_).tobytes(), array("q", step).tobytes(), array("b", finite).tobytes(),
            array("b", ckpt).tobytes()]


def event_row(e: CollectiveEvent, offset: float) -> list:
    """[group, seq, op, enter, exit, nbytes, dtype, shape, peer, step, finite, in_checkpoint] on the
    master's clock (see master.Row)."""
    finite = None if e.finite is None else bool(e.finite)
    return [list(e.group), e.seq, e.op, e.enter + offset, None if e.exit is None else e.exit + offset, e.nbytes,
            e.dtype, list(e.shape), e.peer, e.step, finite, e.in_checkpoint]


class Agent:
    def __init__(self, recorder: CollectiveRecorder, addr: str, rank: int, spec: FaultSpec, slot: int | None = None,
                 attempt: int = 0):
        self.recorder, self.addr, self.rank, self.spec = recorder, addr, rank, spec
        self.slot, self.attempt = slot, attempt
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.node = int(os.environ[NODE_ENV]) if os.environ.get(NODE_ENV) else None  # multi-node jobs
        self.offset = 0.0  # master clock - my clock
        self._clock: deque[tuple[float, float]] = deque(maxlen=64)  # (round trip, offset) samples
        self._sent_at: dict[int, float] = {}
        self._msg = 0
        self._last_ack = time.monotonic()
        self.master_lost = False
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one sender at a time: the thread, or close()
        self._ctx = zmq.Context()  # its own: destroyed (flushing the last summary) when the rank goes
        self._sock = self._connect()
        self._thread = threading.Thread(target=self._run, name="pliant-agent", daemon=True)
        self.probe = MainThreadProbe(spec.progress_cpu_s)
        self._wake_r: socket.socket | None = None
        self._thread_cpu = 0.0  # the agent thread's CPU seconds, as it last read them
        self._closed = False  # the goodbye is out
        self._term_pending = False  # SIGTERM arrived while close() was saying goodbye

    def _connect(self) -> zmq.Socket:
        self._connected_at = time.monotonic()
        self._answered = False  # an acknowledgement came on this connection
        return wire.dealer(self._ctx, self.addr, f"rank{self.rank}-{self.pid}")

    def start(self) -> "Agent":
        """Call from the main thread (signal handlers can only be installed there)."""
        if threading.current_thread() is threading.main_thread():
            self._wake_r, wake_w = socket.socketpair()
            wake_w.setblocking(False)
            self._wake_w = wake_w  # keep it open
            signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
            def on_term(signum, frame):
                # the agent thread, woken by the same signal, says goodbye and exits the process;
                # it owns the socket. Only if it is gone does the main thread do it; after
                # close() (the goodbye said, the rank on its way out) the process just exits
                if self._closed:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(128 + signal.SIGTERM)
                if self._stop.is_set():  # close() is saying goodbye on this thread: exit when it is out
                    self._term_pending = True
                    return
                if self._thread.is_alive():
                    self._thread.join(timeout=2.0)
                self._terminated()

            signal.signal(signal.SIGTERM, on_term)
        self._send({"type": "hello"})
        self._thread.start()
        atexit.register(self.close, "exit")
        return self

    def _terminated(self) -> None:
        body = self.summary()
        body.update(type="bye", reason="terminated: SIGTERM")
        self._send(body)
        with self._lock:
            self._ctx.destroy(linger=1000)  # returns once the goodbye is out (or after 1 s)
            os._exit(128 + signal.SIGTERM)

    def _sleep(self, seconds: float) -> None:
        """Wait for the next report, taking acknowledgements the moment they arrive (their round
        trip sets the clock offset, so a late read would skew it), or for SIGTERM."""
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        if self._wake_r is not None:
            poller.register(self._wake_r, zmq.POLLIN)
        deadline = time.monotonic() + seconds
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            # no wake-ups but these: each one costs the training thread a GIL hand-over
            try:
                # whole milliseconds, rounded up: pyzmq truncates, and a wait under 1 ms became
                # a spin of polls until the deadline (most of this thread's CPU)
                ready = dict(poller.poll(timeout=math.ceil(left * 1000)))
            except zmq.ZMQError:  # the context is gone: the main thread is saying goodbye (SIGTERM)
                self._stop.set()
                return
            if self._sock in ready:
                self._drain_acks()
            # pyzmq's poller gives a plain socket back as its file descriptor
            if self._wake_r is not None and self._wake_r.fileno() in ready and \
                    signal.SIGTERM in self._wake_r.recv(64):
                self._terminated()

    # ----- messages -----
    def _send(self, body: dict[str, Any]) -> None:
        with self._lock:
            self._msg += 1
            now = time.monotonic()
            body.update(rank=self.rank, pid=self.pid, host=self.host, node=self.node, slot=self.slot, attempt=self.attempt,
                        msg=self._msg, sent=now + self.offset)
            self._sent_at[self._msg] = now
            if len(self._sent_at) > 256:
                self._sent_at.pop(next(iter(self._sent_at)))
            wire.send(self._sock, body)

    def summary(self) -> dict[str, Any]:
        snap = self.recorder.snapshot()
        off = self.offset
        main, frames, other_cpu = self.probe.sample()
        device = snap["device"]
        sigs, done = {e.sig for e in snap["inflight"].values()}, []
        for g, rows in snap["done"].items():
            columns = list(zip(*rows))
            sigs.update(columns[1])
            done.append(done_block(g, columns))
        return {"type": "report", "step": snap["step"], "step_started": snap["step_started"] + off,
                "in_checkpoint": snap["in_checkpoint"],
                "inflight": [event_row(e, off) for e in snap["inflight"].values()],
                "events": [event_row(e, off) for e in snap["events"]],
                "done": done, "offset": off, "sigs": {k: list(self.recorder.signatures[k]) for k in sigs},
                # progress evidence (progress.py): the main thread's CPU, bytes and stack, the other threads' CPU
                "main": [main.cpu, main.io, main.stack], "frames": frames, "other_cpu": other_cpu,
                "device": None if device is None else [device[0], device[1] + off]}

    def _drain_acks(self) -> None:
        while True:
            with self._lock:
                if not wire.waiting(self._sock):
                    return
                ack = wire.receive(self._sock)
            now = time.monotonic()
            sent = self._sent_at.pop(ack.get("msg"), None)
            self._last_ack, self._answered = now, True
            if self.master_lost:
                self.master_lost = False
                print(f"pliant: rank {self.rank}: fault monitor master at {self.addr} is back", file=sys.stderr,
                      flush=True)
            if sent is not None:  # the shortest round trip of the recent ones: tracks drift, skips delays
                self._clock.append((now - sent, ack["t"] - (sent + now) / 2))
                self.offset = min(self._clock)[1]

    def cost(self) -> dict[str, float]:
        """CPU seconds this rank has spent on being monitored, read from the process itself: the
        agent thread (summaries, the progress probe, acknowledgements), ZeroMQ's I/O threads,
        the recorder's own time in each wrapped collective on the training thread (binding,
        the event, the finiteness check: not the collective), and the process's total."""
        return {"agent_thread_s": round(self._thread_cpu, 4), "zmq_threads_s": round(threads_cpu("ZMQbg"), 4),
                "recorder_s": round(self.recorder.own_ns / 1e9, 4), "process_s": round(time.process_time(), 4)}

    def _run(self) -> None:
        while True:
            self._sleep(self.spec.report_interval_s)
            self._thread_cpu = time.thread_time()
            if self._stop.is_set():
                return
            if not self._answered and time.monotonic() - self._connected_at > wire.RECONNECT_S:
                with self._lock:  # unanswered since it connected: a new connection
                    self._sock.close(linger=0)
                    self._sock = self._connect()
                self._send({"type": "hello"})
            self._send(self.summary())
            if not self.master_lost and time.monotonic() - self._last_ack > self.spec.master_timeout_s:
                self.master_lost = True
                print(f"pliant: rank {self.rank}: no answer from the fault monitor master at {self.addr} for "
                      f"{self.spec.master_timeout_s:g} s; training goes on unmonitored", file=sys.stderr, flush=True)

    def close(self, reason: str = "finished") -> None:
        """A last summary saying why this rank stops (finished, exit, or an exception's text)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._wake_r is not None:
            try:  # wake the agent thread from its poll (any byte but SIGTERM's)
                self._wake_w.send(b"\0")
            except OSError:
                pass
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.spec.report_interval_s + 1)
        body = self.summary()
        body["type"] = "bye"
        body["reason"] = reason
        body["cost"] = self.cost()
        self._send(body)
        with self._lock:
            self._ctx.destroy(linger=1000)
        self._closed = True
        if self._term_pending:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + signal.SIGTERM)
