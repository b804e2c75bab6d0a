"""The node agent (docs/faults.md, "Across nodes"): a thread in each node's supervisor of a
multi-node job, the master's eyes and hands on that node.

* It registers the node with the master (node rank, host, pid) and waits for the answer:
  a master that does not answer within the rendezvous timeout, or one that says another
  host already claimed this node rank, is an error before any rank starts.
* Every `report_interval_s` it sends the outside view of the node's ranks (progress.py):
  for every process under the node's torchrun, its state and its main thread's CPU and
  bytes from /proc; a process that disappears is reported at once (a crash on this node).
  Its reports are the node's heartbeat: a node whose agent and ranks all fall silent is lost.
* The master's acknowledgements carry its decisions: the restart and stop incidents of this
  start of the job, which the supervisor acts on (every node stops; after a restart incident
  all start again without the culprit's slot or node, after a stop none does).
"""
from __future__ import annotations

import socket
import sys
import threading
import time
from typing import Any

import psutil
import zmq

from . import wire
from .progress import read_thread

PID_POLL_S = 0.05


class NodeAgentError(RuntimeError):
    """The master refused this node, or never answered."""


class NodeAgent:
    def __init__(self, addr: str, node: int, host: str, attempt: int, report_interval_s: float,
                 master_timeout_s: float, min_cpu_s: float = 0.01):
        """`min_cpu_s`: a rank's CPU growth that is progress by itself (faults.progress_cpu_s)."""
        self.addr, self.node, self.host, self.attempt = addr, node, host, attempt
        self.min_cpu_s = min_cpu_s
        self._last: dict[int, Any] = {}  # pid -> its last sample
        self.report_interval_s, self.master_timeout_s = report_interval_s, master_timeout_s
        self.pid = psutil.Process().pid
        self.root: int | None = None  # the node's torchrun: its descendants are the ranks
        self.incidents: list[dict[str, Any]] = []
        self.error: str | None = None
        self.registered = threading.Event()
        self.master_lost = False
        self.moved_on = False  # the master answers for a later start: node 0 restarted the job
        self._tree: list[int] = []
        self._tree_at = float("-inf")
        self._seen: set[int] = set()
        self._msg = 0
        self._last_ack = time.monotonic()
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._sock = self._connect()
        self._thread = threading.Thread(target=self._run, name="pliant-node-agent", daemon=True)

    def _connect(self) -> zmq.Socket:
        self._connected_at = time.monotonic()
        return wire.dealer(self._ctx, self.addr, f"node{self.node}-{socket.gethostname()}-{self.pid}")

    def register(self, timeout_s: float) -> "NodeAgent":
        """Say hello and wait for the master's answer (raises NodeAgentError)."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.registered.wait(0.1):
            if time.monotonic() > deadline:
                self.close()
                raise NodeAgentError(f"node {self.node}: the fault monitor master at {self.addr} did not answer "
                                     f"within {timeout_s:g} s: is cluster.hosts[0] an address this node reaches, and "
                                     f"is node 0 running?")
        if self.error:
            self.close()
            raise NodeAgentError(f"node {self.node}: {self.error}")
        return self

    def watch(self, root_pid: int | None) -> None:
        """Follow the processes under `root_pid` (this start's torchrun)."""
        self.root, self._seen = root_pid, set()

    # ----- the thread -----
    def _send(self, body: dict[str, Any]) -> None:
        self._msg += 1
        body.update(type="node", node=self.node, host=self.host, pid=self.pid, attempt=self.attempt, msg=self._msg)
        wire.send(self._sock, body)

    def _processes(self, rescan: bool) -> tuple[dict[int, list], list[int]]:
        """The processes under torchrun (the tree is scanned once per report; in between only
        the known ones are read) and those gone since the last look."""
        procs: dict[int, list] = {}
        if self.root is not None:
            if rescan:
                try:
                    self._tree = [p.pid for p in psutil.Process(self.root).children(recursive=True)]
                except psutil.NoSuchProcess:
                    self._tree = []
            prev, self._last = self._last, {}
            for pid in self._tree:
                s = read_thread(pid, prev=prev.get(pid), min_cpu_s=self.min_cpu_s)
                if s is not None and s.state not in ("Z", "X"):
                    procs[pid] = [s.cpu, s.io, s.state, s.wait]
                    self._last[pid] = s
        gone = sorted(self._seen - set(procs))
        self._seen = set(procs)
        return procs, gone

    def _run(self) -> None:
        self._send({"hello": True})
        next_report = 0.0
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if poller.poll(PID_POLL_S * 1000):
                self._drain()
            now = time.monotonic()
            if not self.registered.is_set() and now - self._connected_at > wire.RECONNECT_S:  # unanswered
                poller.unregister(self._sock)
                self._sock.close(linger=0)
                self._sock = self._connect()
                poller.register(self._sock, zmq.POLLIN)
                self._send({"hello": True})
            procs, gone = self._processes(rescan=now >= next_report)
            if gone or now >= next_report:
                next_report = now + self.report_interval_s
                self._send({"procs": {str(k): v for k, v in procs.items()}, "gone": gone})
            if self.registered.is_set() and not self.master_lost and now - self._last_ack > self.master_timeout_s:
                self.master_lost = True
                print(f"pliant: node {self.node}: no answer from the fault monitor master at {self.addr} for "
                      f"{self.master_timeout_s:g} s; this node goes on unmonitored", file=sys.stderr, flush=True)

    def _drain(self) -> None:
        while wire.waiting(self._sock):
            ack = wire.receive(self._sock)
            if ack.get("attempt", -1) > self.attempt:
                self.moved_on = True
            if ack.get("attempt") != self.attempt:
                continue  # the master of another start
            self._last_ack = time.monotonic()
            if ack.get("error"):
                self.error = ack["error"]
            if ack.get("decisions"):
                self.incidents = ack["decisions"]
            self.registered.set()

    def close(self) -> None:
        """Stop, saying goodbye: a node that leaves is not a lost node."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        self._send({"bye": True, "procs": {}, "gone": []})
        self._ctx.destroy(linger=500)
