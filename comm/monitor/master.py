"""The master: one per start of the job, a thread of the first node's supervisor beside
torchrun (docs/faults.md).

It binds a ROUTER socket, acknowledges every agent summary with its clock, watches the
processes of the ranks on its own host (a pidfd each: a crash is a process gone without a
goodbye), and every `check_interval_s` runs the rules of `classify.JobPicture`. Each
incident is written atomically to RUN_DIR/incidents/incident-a{attempt}-{n}.json; the
launcher's supervisor acts on those with `action: restart`. When stopped it writes a summary
of what it saw to RUN_DIR/monitor/master-a{attempt}.json.
"""
from __future__ import annotations

import json
import math
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import zmq

from pliant.io import atomic_write_text, strict_dumps

from . import wire
from .classify import Incident, JobPicture
from .progress import py_spy_stack, read_thread
from .spec import FaultSpec

DECISIONS = ("restart", "stop")  # the actions a supervisor carries out (stop: the job's own error, no restart)


def incident_path(run_dir: Path, attempt: int, n: int) -> Path:
    return run_dir / "incidents" / f"incident-a{attempt}-{n:03d}.json"


def read_incidents(run_dir: Path, attempt: int | None = None) -> list[dict]:
    """Every incident written so far (of one start of the job, or all), oldest first."""
    folder = Path(run_dir) / "incidents"
    if not folder.is_dir():
        return []
    pattern = f"incident-a{attempt}-*.json" if attempt is not None else "incident-a*.json"
    return [json.loads(p.read_text()) for p in sorted(folder.glob(pattern))]


class Master:
    def __init__(self, spec: FaultSpec, world: int, run_dir: Path, attempt: int = 0, node: int | None = None):
        self.spec, self.run_dir, self.attempt = spec, Path(run_dir), attempt
        self.node = node  # multi-node jobs: the node the master runs on (its process watch sees that node's ranks)
        self.picture = JobPicture(spec, world, attempt)
        self.host = socket.gethostname()
        self.incidents: list[Incident] = []
        self.messages = 0
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._cpu0 = 0.0
        self._ctx = zmq.Context.instance()
        self.sock = self._ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # an agent that reconnects (wire.RECONNECT_S) keeps its identity: the new connection
        # takes it over, where ZeroMQ's default would drop its messages while the old one lives
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self._pidfds: dict[int, int] = {}  # pid of a rank's process -> its pidfd (-1: none to be had)
        self._by_fd: dict[int, object] = {}  # open pidfd -> the rank's state

    def bind(self, addr: str) -> str:
        self.sock.bind(addr)
        return self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def stop(self, *_) -> None:
        self._stop.set()

    # ----- processes on this host -----
    def _local(self, st) -> bool:
        """Does this rank run where the master's process watch can see it? (Other nodes' ranks
        are watched by their node agents.)"""
        if self.node is not None and st.node is not None:
            return st.node == self.node
        return st.host == self.host

    def _watch(self, poller: zmq.Poller) -> None:
        """Watch the process of each rank on this host that is not watched yet: a pidfd in the
        main loop's poller, readable when the process exits (a crash is a process gone without a
        goodbye): no polling. Where pidfds are missing (not Linux, before 5.3) the checks poll."""
        for st in self.picture.ranks.values():
            if st.pid in self._pidfds or st.gone_at is not None or not self._local(st):
                continue
            try:
                fd = os.pidfd_open(st.pid) if hasattr(os, "pidfd_open") else -1
            except ProcessLookupError:
                st.process, st.gone_at = "gone", time.monotonic()
                continue
            except OSError:
                fd = -1
            self._pidfds[st.pid] = fd
            if fd >= 0:
                poller.register(fd, zmq.POLLIN)
                self._by_fd[fd] = st

    def _gone(self, poller: zmq.Poller, fd: int) -> None:
        st = self._by_fd.pop(fd)
        poller.unregister(fd)
        os.close(fd)
        if st.gone_at is None:
            st.process, st.gone_at = "gone", time.monotonic()

    def _look(self, now: float) -> None:
        """Every report interval: the process state and main thread's CPU and bytes, from /proc,
        of each local rank that missed its last two reports (the outside view of its progress,
        which holds while the rank itself is silent: its stuck window of progress_window_s then
        runs inside the silence threshold of 10 report gaps), and of every local rank without
        a pidfd (whether it is gone). A rank that reports gives its own evidence."""
        quiet = now - 2 * self.spec.report_interval_s
        for st in list(self.picture.ranks.values()):
            if not self._local(st) or st.gone_at is not None:
                continue
            if st.last_seen > quiet and self._pidfds.get(st.pid, -1) >= 0:
                st.outside = None  # a new view when it falls silent: no stale sample to compare with
                continue
            # the main thread's stat: its state is the process's (a zombie's, a stopped one's)
            sample = read_thread(st.pid, prev=st.outside.last if st.outside is not None else None,
                                 min_cpu_s=self.spec.progress_cpu_s)
            st.process = "gone" if sample is None else _STATES.get(sample.state, "running")
            if st.process == "gone":
                st.gone_at = now
            else:
                self.picture.observe(st.rank, sample, now)

    # ----- main loop -----
    def serve(self, tick: "Callable[[JobPicture], None] | None" = None) -> None:
        self._cpu0 = time.thread_time()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        now = time.monotonic()
        next_check, next_look = now + self.spec.check_interval_s, now + self.spec.report_interval_s
        while not self._stop.is_set():
            timeout = max(0.0, min(next_check, next_look) - time.monotonic())
            for fd, _ in poller.poll(math.ceil(timeout * 1000)):  # pyzmq truncates: under 1 ms it would spin
                if fd in self._by_fd:
                    self._gone(poller, fd)
            # what is queued, no more: a receive that finds nothing raises, and pyzmq's exception
            # cost the master more than the message did
            while wire.waiting(self.sock):
                ident, payload = self.sock.recv_multipart(flags=zmq.NOBLOCK)
                now = time.monotonic()
                try:
                    ack = self._handle(wire.unpack(payload), now)
                except (ValueError, KeyError, TypeError, IndexError) as e:  # bound on every interface
                    print(f"pliant monitor: ignored a malformed message ({type(e).__name__}: {e})",
                          file=sys.stderr, flush=True)
                    continue
                self.sock.send_multipart([ident, wire.pack(ack)])
                self.messages += 1
            self._watch(poller)
            now = time.monotonic()
            if now >= next_look:
                next_look = now + self.spec.report_interval_s
                self._look(now)
            if now >= next_check:
                next_check = now + self.spec.check_interval_s
                for inc in self.picture.check(now):
                    self._write(inc)
                if tick is not None:
                    tick(self.picture)
        self._summary()

    def _handle(self, msg: dict, now: float) -> dict:
        """One agent's or node agent's message into the picture; the acknowledgement to send.
        A message of another start of the job (a rank or node of the previous one, still going
        down) is acknowledged, with this start's number, and left out."""
        ack = {"msg": msg.get("msg"), "t": now, "attempt": self.attempt}
        if msg.get("attempt", self.attempt) != self.attempt:
            return ack
        if msg.get("type") == "node":  # a node agent: its view of its ranks; it hears the decisions
            ack["error"] = self.picture.node_report(msg, now)
            ack["decisions"] = [i.to_dict() for i in self.incidents if i.action in DECISIONS]
        else:
            self.picture.ingest(msg, now)
        return ack

    def _write(self, inc: Incident) -> None:
        if inc.kind == "noncomm_hang":  # the culprits' Python stacks, read from outside without their GIL
            for r in inc.ranks:
                st = self.picture.ranks.get(r)
                if st is not None and self._local(st) and st.gone_at is None:
                    inc.evidence.setdefault("stack_outside", {})[str(r)] = py_spy_stack(st.pid)
        self.incidents.append(inc)
        path = incident_path(self.run_dir, self.attempt, len(self.incidents))
        atomic_write_text(path, strict_dumps(inc.to_dict(), indent=1))
        where = f" link {inc.link[0]}->{inc.link[1]}" if inc.link else ""
        if inc.exclude_nodes:
            where += f" (node {', '.join(map(str, inc.exclude_nodes))})"
        elif any(n is not None for n in inc.nodes):
            where += f" (node {', '.join(str(n) for n in inc.nodes)})"
        on = inc.ranks or inc.evidence.get("raised_by", [])  # an error blames no rank: who raised it
        print(f"pliant monitor: {inc.kind} on rank(s) {on}{where} at step {inc.step}, detected in "
              f"{inc.detection_s:.2f} s; action: {inc.action} ({path})", file=sys.stderr, flush=True)

    def _summary(self) -> None:
        ranks = {str(r): {"pid": st.pid, "host": st.host, "node": st.node, "slot": st.slot, "step": st.step,
                          "said": st.bye, "process": st.process, "cost": st.cost}
                 for r, st in sorted(self.picture.ranks.items())}
        body = {"attempt": self.attempt, "uptime_s": round(time.monotonic() - self.started, 3),
                "cpu_s": round(time.thread_time() - self._cpu0, 3),  # the master thread's own (its pid watch included)
                "messages": self.messages, "ranks": ranks, "incidents": [i.to_dict() for i in self.incidents],
                "baselines": {str(k): len(v) for k, v in self.picture.durations.items()},
                # collectives every member completed and reported, per group
                "collectives": {",".join(map(str, g)): ring.base for g, ring in self.picture.rings.items()}}
        atomic_write_text(self.run_dir / "monitor" / f"master-a{self.attempt}.json", strict_dumps(body, indent=1))


# /proc/PID/stat's state letter -> what the rules call it
_STATES = {"R": "running", "S": "sleeping", "D": "disk-sleep", "I": "idle", "T": "stopped", "t": "stopped",
           "Z": "gone", "X": "gone", "x": "gone"}


def address_file(run_dir: Path, attempt: int) -> Path:
    """Where the master of one start writes the address it listens on (atomically)."""
    return Path(run_dir) / "monitor" / f"addr-a{attempt}"


class MasterThread:
    """The master of one start (attempt) of a job on a thread of the calling process: the
    supervisor of the first node, or the RL driver. Starting it costs no interpreter and no
    imports (a process of its own paid 0.14 s of CPU per start, as much as it then spent
    serving a 30-step job). It binds before the constructor returns (`address`; also written
    to `address_file`) and serves until `stop`. `tick`, if given, is called with the picture
    after every check (fault injection's master faults: runtime/faults.py). A master that
    raises leaves the job running unmonitored: `error` says why."""

    def __init__(self, run_dir: Path, world: int, attempt: int, spec: FaultSpec, bind: str | None = None,
                 node: int | None = None, tick: Callable[[JobPicture], None] | None = None):
        self.master = Master(spec, world, Path(run_dir), attempt, node)
        where = bind or "tcp://127.0.0.1:*"
        try:
            self.address = self.master.bind(where)
        except zmq.ZMQError as e:
            self.master.sock.close(linger=0)
            raise RuntimeError(f"the fault monitor master cannot listen on {where}: {e}") from None
        atomic_write_text(address_file(run_dir, attempt), self.address)
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, args=(tick,), name=f"pliant-master-a{attempt}", daemon=True)
        self._thread.start()

    def _run(self, tick) -> None:
        try:
            self.master.serve(tick)
        except Exception as e:  # noqa: BLE001 (a monitor's failure must not take the job down)
            self.error = f"{type(e).__name__}: {e}"
            print(f"pliant monitor: the master stopped: {self.error}", file=sys.stderr, flush=True)
        finally:
            self.master.sock.close(linger=0)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop serving; it writes RUN_DIR/monitor/master-a{attempt}.json on its way out."""
        self.master.stop()
        self._thread.join(timeout_s)
