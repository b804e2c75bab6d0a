"""The master's picture of the job and its rules (docs/faults.md): the agents' summaries go
in, incidents come out. No sockets and no processes here: `master.py` feeds it.

Every alarm threshold is relative to a baseline measured on this job: a collective's median
and longest duration for its (group, op), the agents' usual report gap, the other ranks' delays, the
median cell of the point-to-point latency matrix. Warm-up steps and checkpoint writes are
left out of the baselines and never raise an alarm.
"""
from __future__ import annotations

import math
import statistics
import time
from collections import defaultdict, deque
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np

from .completed import Completed, GroupRing, columns
from .progress import ThreadProgress, ThreadSample
from .ops import POINT_TO_POINT, SENDS, signature, signature_id
from .spec import FaultSpec

FATAL = {"crash", "comm_hang", "noncomm_hang", "desync"}


class Row(NamedTuple):
    """One collective as an agent reported it (agent.event_row), times on the master's clock."""
    group: tuple[int, ...]
    seq: int
    op: str
    enter: float
    exit: float | None
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    peer: int | None
    step: int
    finite: bool | None
    in_checkpoint: bool

    @classmethod
    def parse(cls, raw: list) -> "Row":
        g, seq, op, enter, ex, nbytes, dtype, shape, peer, step, finite, ckpt = raw
        return cls(tuple(g), seq, op, enter, ex, nbytes, dtype, tuple(shape), peer, step, finite, ckpt)

    @property
    def signature(self) -> tuple:
        return signature(self.op, self.dtype, self.shape)


@dataclass
class Incident:
    kind: str  # crash, comm_hang, noncomm_hang, straggler, slow_link, nan, desync
    ranks: list[int]  # the culprits
    action: str  # restart (stop the job, exclude `exclude`), stop (the job's own error: no restart), report, skip
    evidence: dict[str, Any]
    fault_time: float  # master clock: the earliest moment the fault is known to have happened by
    detected: float  # master clock
    step: int
    link: list[int] | None = None  # [src, dst] for a link
    group: list[int] | None = None
    exclude: list[int] = field(default_factory=list)  # ranks whose slots a restart leaves out
    slots: list[int | None] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)
    detected_wall: float = 0.0
    attempt: int = 0
    nodes: list[int | None] = field(default_factory=list)  # the culprits' nodes (multi-node jobs)
    exclude_nodes: list[int] = field(default_factory=list)  # whole nodes a restart leaves out

    @property
    def detection_s(self) -> float:
        return self.detected - self.fault_time

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "detection_s": round(self.detection_s, 4)}


def by_chance(last: int, steps: int, world: int) -> float:
    """The chance that, arrival order being random, some rank is the last to arrive in at
    least `last` of `steps` steps (binomial tail with p = 1/world, times world ranks)."""
    p = 1.0 / world
    tail = sum(math.comb(steps, j) * p ** j * (1 - p) ** (steps - j) for j in range(last, steps + 1))
    return min(1.0, world * tail)


@dataclass
class NodeState:
    """A node of a multi-node job as its node agent (in the node's supervisor) reports it."""
    node: int
    host: str
    pid: int
    last_seen: float
    gaps: deque = field(default_factory=lambda: deque(maxlen=50))
    bye: bool = False  # its supervisor closed it: the node left, it is not lost


@dataclass
class RankState:
    rank: int
    pid: int
    host: str
    slot: int | None
    last_seen: float
    node: int | None = None
    step: int = 0
    in_checkpoint: bool = False
    inflight: dict[tuple[int, ...], Row] = field(default_factory=dict)
    gaps: deque = field(default_factory=lambda: deque(maxlen=50))
    bye: str | None = None  # why it said goodbye: finished, exit, exception: ...
    cost: dict[str, float] | None = None  # what being monitored cost it, CPU seconds (its goodbye)
    gone_at: float | None = None  # when its process was seen gone (same host only)
    process: str = "unknown"  # running, sleeping, stopped, zombie, gone, unknown (remote host)
    # progress evidence (progress.py): the main thread seen by the agent and from outside (its
    # host's process watch), the other threads' CPU, the last Python stack the agent sent, and
    # on CUDA whether work is queued on the device and when it last moved
    inside: ThreadProgress | None = None
    outside: ThreadProgress | None = None
    other_cpu: deque = field(default_factory=lambda: deque(maxlen=64))
    frames: list[str] = field(default_factory=list)
    device: tuple[bool, float] | None = None

    def stuck_for(self, now: float) -> float | None:
        """How long the main thread has shown no progress (None: no evidence at all)."""
        seen = [p.since for p in (self.inside, self.outside) if p is not None and p.since is not None]
        if not seen:
            return None
        stuck = now - max(seen)
        if self.device is not None and self.device[0]:  # the host may spin while the device is stuck
            stuck = max(stuck, now - self.device[1])
        return stuck

    def moving(self, now: float, window: float, frac: float) -> bool:
        """Did the rank's other threads (gloo's, moving a collective's bytes) use more than
        `frac` of a core over the last `window` seconds?"""
        recent = [(t, c) for t, c in self.other_cpu if t >= now - window]
        if len(recent) < 2 or recent[-1][0] - recent[0][0] <= 0:
            return False
        return (recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0]) > frac


class JobPicture:
    """What the master knows about one start of the job, and the rules over it."""

    def __init__(self, spec: FaultSpec, world: int, attempt: int = 0, max_rows: int = 20000):
        self.spec, self.world, self.attempt = spec, world, attempt
        self.ranks: dict[int, RankState] = {}
        self.nodes: dict[int, NodeState] = {}
        # (group, seq) -> {rank: Row} for collectives; (src, dst, seq) -> Row for p2p sends / recvs
        self.table: dict[tuple, dict[int, Row]] = {}
        self.sends: dict[tuple[int, int, int], Row] = {}
        self.recvs: dict[tuple[int, int, int], Row] = {}
        # (group, op), (group size, op) and op -> recent durations of clean collectives
        self.durations: dict[Any, deque] = defaultdict(lambda: deque(maxlen=400))
        self.step_delay: dict[int, dict[int, float]] = defaultdict(lambda: defaultdict(float))
        self.link_latency: dict[tuple[int, int], deque] = defaultdict(lambda: deque(maxlen=50))
        self.reported: set[tuple] = set()
        self.flagged_since: dict[tuple, float] = {}
        self.stopped = False  # a fatal incident was issued: the job is being stopped
        self.max_rows = max_rows
        # collectives (group, seq) a report added to or changed since the last check: the
        # desync and NaN rules look at these only (an unchanged row cannot change their verdict)
        self._touched: set[tuple] = set()
        self._scan: list[tuple] = []
        self._order: deque = deque()
        # completed collectives as the agents' columns, per group, until every member reported them
        self.rings: dict[tuple[int, ...], GroupRing] = {}
        self.signatures: dict[int, tuple] = {}  # signature id -> (op, dtype, shape or None), from the agents
        self._found: dict[str, list[tuple]] = {"desync": [], "nan": []}  # what judging the columns found

    # ----- ingestion -----
    def ingest(self, msg: dict[str, Any], now: float) -> None:
        r = int(msg["rank"])
        st = self.ranks.get(r)
        if st is None or st.pid != msg["pid"]:
            st = self.ranks[r] = RankState(r, msg["pid"], msg["host"], msg.get("slot"), now, msg.get("node"))
        else:
            st.gaps.append(now - st.last_seen)
            st.last_seen = now
        if msg["type"] == "hello":
            return
        st.step, st.in_checkpoint = msg["step"], msg["in_checkpoint"]
        if msg.get("main") is not None:
            if st.inside is None:
                st.inside = ThreadProgress(self.spec.progress_cpu_s)
            st.inside.update(ThreadSample(*msg["main"]), now)
            st.other_cpu.append((now, msg["other_cpu"]))
            if msg.get("frames"):
                st.frames = msg["frames"]
            st.device = None if msg.get("device") is None else tuple(msg["device"])
        if msg["type"] == "bye":
            st.bye = msg.get("reason", "exit")
            st.cost = msg.get("cost")
        st.inflight = {}
        for raw in msg["inflight"]:
            row = Row.parse(raw)
            st.inflight[row.group] = row
            self._record(r, row)
        for raw in msg["events"]:
            self._record(r, Row.parse(raw))
        for k, sig in (msg.get("sigs") or {}).items():
            if int(k) not in self.signatures:
                op, dtype, shape = sig
                self.signatures[int(k)] = (op, dtype, None if shape is None else tuple(shape))
        off = float(msg.get("offset") or 0.0)
        for block in msg.get("done") or ():
            group, (seq, sig, enter, exit_, step, finite, ckpt) = columns(block)
            ring = self.rings.get(group)
            if ring is None:
                ring = self.rings[group] = GroupRing(group)
            ring.put(r, seq, sig, enter + off, exit_ + off, step, finite, ckpt)

    def _record(self, rank: int, row: Row) -> None:
        if row.op in POINT_TO_POINT:
            sent = row.op in SENDS
            src, dst = (rank, row.peer) if sent else (row.peer, rank)
            book = self.sends if sent else self.recvs
            key = (src, dst, row.seq)
            book[key] = row
            self._remember(("p2p", key))
            self._transfer(key)
            return
        key = (row.group, row.seq)
        members = self.table.get(key)
        if members is None:
            members = self.table[key] = {}
            self._remember(("c", key))
        self._touched.add(key)
        members[rank] = row  # (in flight: completed collectives come as columns, judged in check)

    def _remember(self, key) -> None:
        self._order.append(key)
        while len(self._order) > self.max_rows:
            kind, old = self._order.popleft()
            if kind == "c":
                self.table.pop(old, None)
            else:
                self.sends.pop(old, None)
                self.recvs.pop(old, None)

    def _clean(self, row: Row) -> bool:
        return row.step > self.spec.warmup_steps and not row.in_checkpoint

    def _op(self, sid: int) -> str:
        return self.signatures.get(sid, ("?",))[0]

    def _judge(self, c: Completed) -> None:
        """A run of collectives every member of a group completed (the agents' columns): their
        durations feed the baselines and who arrived last, by how much, the straggler rule;
        differing signatures and mixed finiteness are kept for the desync and NaN rules."""
        group, m = c.group, len(c.group)
        clean = (c.step > self.spec.warmup_steps).all(axis=0) & (c.ckpt == 0).all(axis=0)
        lead_sid = c.sig[0]
        if clean.any():
            took = c.exit - c.enter
            for sid in set(lead_sid[clean].tolist()):  # (np.unique imports numpy.ma on first use: 25 ms)
                op = self._op(sid)
                mask = clean & (lead_sid == sid)
                values = took[:, mask].ravel().tolist()  # the group's own baseline, and pooled ones for new groups
                for key in ((group, op), (m, op), op):
                    self.durations[key].extend(values)
                if m < 2 or op.endswith("_object") or op == "broadcast_object_list":
                    continue  # rank 0's planning ends before it broadcasts the plan: not a straggler
                cols = np.nonzero(mask)[0]
                order = np.argsort(c.enter[:, cols], axis=0)
                last, second = order[-1], order[-2]
                gaps = c.enter[last, cols] - c.enter[second, cols]
                steps = c.step[last, cols]
                for step, who, gap in zip(steps.tolist(), last.tolist(), gaps.tolist()):
                    self.step_delay[step][group[who]] += gap
        odd = np.nonzero((c.sig != lead_sid).any(axis=0))[0]
        if len(odd):
            j = int(odd[0])
            self._found["desync"].append((group, int(c.seq[j]), {r: int(c.sig[i, j]) for i, r in enumerate(group)},
                                          float(c.enter[:, j].min()), int(c.step[:, j].min())))
        bad, good = c.finite == 0, c.finite == 1
        mixed = np.nonzero(bad.any(axis=0) & good.any(axis=0))[0]
        if len(mixed):
            j = int(mixed[np.argmin([c.enter[bad[:, k], k].min() for k in mixed])])
            self._found["nan"].append((float(c.enter[bad[:, j], j].min()), group, int(c.seq[j]), self._op(int(lead_sid[j])),
                                       [group[i] for i in np.nonzero(bad[:, j])[0]],
                                       [group[i] for i in np.nonzero(good[:, j])[0]], int(c.step[:, j].min())))

    def _transfer(self, key: tuple[int, int, int]) -> None:
        send, recv = self.sends.get(key), self.recvs.get(key)
        if send is None or recv is None or recv.exit is None or not (self._clean(send) and self._clean(recv)):
            return
        self.link_latency[key[:2]].append(recv.exit - max(send.enter, recv.enter))

    def node_report(self, msg: dict[str, Any], now: float) -> str | None:
        """A node agent's report: the outside view of its ranks (state, main thread's CPU and
        bytes) and the processes gone since its last report. Returns an error for a node rank
        that another live node agent already claimed."""
        n, ident = int(msg["node"]), (msg["host"], msg["pid"])
        ns = self.nodes.get(n)
        if ns is not None and (ns.host, ns.pid) != ident:
            if now - ns.last_seen <= self.silence_threshold(ns):
                return (f"node rank {n} is already claimed by {ns.host} (supervisor pid {ns.pid}); every node needs "
                        f"its own --node-rank")
            ns = None  # that one is gone
        if ns is None:
            ns = self.nodes[n] = NodeState(n, msg["host"], msg["pid"], now)
        else:
            ns.gaps.append(now - ns.last_seen)
            ns.last_seen = now
        ns.bye = bool(msg.get("bye"))
        procs, gone = msg.get("procs") or {}, set(msg.get("gone") or ())
        for st in self.ranks.values():
            if st.node != n or st.gone_at is not None:
                continue
            seen = procs.get(str(st.pid))
            if seen is not None:
                cpu, io, state, *wait = seen
                st.process = {"T": "stopped", "t": "stopped", "R": "running", "D": "disk-sleep"}.get(state, "sleeping")
                self.observe(st.rank, ThreadSample(cpu, io, None, state, *wait), now)
            elif st.pid in gone:
                st.process, st.gone_at = "gone", now
        return None

    def _node_quiet(self, node: int | None, now: float) -> bool:
        """Has the node agent of `node` missed its last few reports (and not yet its silence
        threshold, after which the node is lost or, its ranks still speaking, only its agent)?"""
        ns = self.nodes.get(node) if node is not None else None
        if ns is None or ns.bye:
            return False
        quiet = now - ns.last_seen
        return 3 * self.spec.report_interval_s < quiet <= self.silence_threshold(ns) + 2 * self.spec.check_interval_s

    def observe(self, rank: int, sample: ThreadSample, now: float) -> None:
        """A look at rank's main thread from outside its process (its host's process watch)."""
        st = self.ranks.get(rank)
        if st is None:
            return
        if st.outside is None:
            st.outside = ThreadProgress(self.spec.progress_cpu_s)
        st.outside.update(sample, now)

    def _evidence(self, st: RankState, now: float) -> dict[str, Any]:
        """What a hang incident says of a culprit's progress."""
        stuck = st.stuck_for(now)
        ev: dict[str, Any] = {"stuck_s": None if stuck is None else round(stuck, 3)}
        for name, p in (("inside", st.inside), ("outside", st.outside)):
            if p is not None and p.last is not None:
                ev[f"main_thread_{name}"] = {"cpu_s": round(p.last.cpu, 3), "io_bytes": p.last.io,
                                             "no_progress_s": round(now - p.since, 3),
                                             **({"state": p.last.state} if p.last.state else {}),
                                             **({"run_queue_wait_s": round(p.last.wait, 3)} if p.last.wait else {})}
        if st.frames:
            ev["stack"] = st.frames
        if st.device is not None:
            ev["device"] = {"queued": st.device[0], "last_moved_s": round(now - st.device[1], 3)}
        return ev

    # ----- baselines -----
    def hang_threshold(self, group: tuple[int, ...], rows: list[Row]) -> float:
        s = self.spec
        if any(not self._clean(r) for r in rows):
            return s.hang_warmup_s
        op = rows[0].op
        for key in ((group, op), (len(group), op), op):  # adaptive plans form groups they never formed before
            base = self.durations.get(key)
            if base is not None and len(base) >= 5:
                return max(s.hang_min_s, s.hang_factor * statistics.median(base), s.hang_max_factor * max(base))
        return s.hang_warmup_s

    def silence_threshold(self, st: "RankState | NodeState") -> float:
        usual = statistics.median(st.gaps) if len(st.gaps) >= 3 else self.spec.report_interval_s
        return max(self.spec.heartbeat_min_s, self.spec.heartbeat_factor * usual)

    # ----- rules -----
    def check(self, now: float) -> list[Incident]:
        if self.stopped:
            self._touched.clear()
            return []
        for ring in self.rings.values():
            while (run := ring.completed()) is not None:
                self._judge(run)
        self._scan = sorted((k for k in self._touched if k in self.table), key=lambda k: k[1])
        self._touched = set()
        found: list[Incident] = []
        for rule in (self._errors, self._desync, self._nan, self._nodes_lost, self._crashes, self._hangs,
                     self._silent, self._stragglers, self._links):
            for inc in rule(now):
                key = (inc.kind, tuple(inc.ranks), tuple(inc.link or ()), inc.action)
                if key in self.reported:
                    continue
                self.reported.add(key)
                self._describe(inc)
                found.append(inc)
                if inc.action in ("restart", "stop"):
                    self.stopped = True
                    return found
        return found

    def _describe(self, inc: Incident) -> None:
        inc.slots = [self.ranks[r].slot if r in self.ranks else None for r in inc.ranks]
        inc.hosts = [self.ranks[r].host if r in self.ranks else "?" for r in inc.ranks]
        inc.nodes = [self.ranks[r].node if r in self.ranks else None for r in inc.ranks]
        inc.detected_wall = time.time()
        inc.attempt = self.attempt

    def _step(self) -> int:
        return max((st.step for st in self.ranks.values()), default=0)

    def _busy_checkpointing(self, group) -> bool:
        return any(self.ranks[r].in_checkpoint for r in group if r in self.ranks)

    def _desync(self, now: float) -> list[Incident]:
        # in flight (a desync often hangs): the members' rows, with the columns of those that completed it
        for group, seq in self._scan:
            members = self.table[(group, seq)]
            sids = {r: signature_id(row.signature) for r, row in members.items()}
            names = {r: row.signature for r, row in members.items()}
            ring = self.rings.get(group)
            for r, (sid, _, _) in (ring.reported(seq) if ring is not None else {}).items():
                sids.setdefault(r, sid)
            rows = list(members.values())
            inc = self._desync_of(group, seq, sids, names, min(r.enter for r in rows), min(r.step for r in rows), now)
            if inc is not None:
                return [inc]
        found, self._found["desync"] = self._found["desync"], []
        for group, seq, sids, enter, step in found:
            inc = self._desync_of(group, seq, sids, {}, enter, step, now)
            if inc is not None:
                return [inc]
        return []

    def _desync_of(self, group: tuple[int, ...], seq: int, sids: dict[int, int], names: dict[int, tuple],
                   enter: float, step: int, now: float) -> Incident | None:
        """Collective `seq` of `group` whose members (so far) disagree on its signature: the
        minority are the culprits (a tie waits for the rest of the group)."""
        if len(sids) < 2:
            return None
        by: dict[int, list[int]] = defaultdict(list)
        for r, sid in sids.items():
            by[sid].append(r)
        if len(by) < 2:
            return None
        sizes = sorted(map(len, by.values()), reverse=True)
        if sizes[0] == sizes[1] and len(sids) < len(group):
            return None  # a tie so far (e.g. one rank of each kind): the rest of the group tells which is odd
        majority = max(by.values(), key=len)
        culprits = sorted(r for rs in by.values() if rs is not majority for r in rs)
        readable = {str(r): list(names.get(r) or self.signatures.get(sids[r], (f"signature {sids[r]}",)))
                    for r in sorted(sids)}
        return Incident("desync", culprits, "restart", {"group": list(group), "seq": seq, "signatures": readable},
                        fault_time=enter, detected=now, step=step, group=list(group), exclude=culprits)

    def _nan(self, now: float) -> list[Incident]:
        """The first collective whose inputs were finite on some members and not on others:
        activations (SP) and gradients (reductions) carry a bad value to the peers, so the
        source is the rank that sent non-finite data while its peers' was still finite."""
        found, self._found["nan"] = self._found["nan"], []
        candidates = list(found)  # (t, group, seq, op, bad, good, step), from the columns
        for group, seq in self._scan:  # in flight: the rows, with the columns of the members that completed it
            members = self.table[(group, seq)]
            flags = {r: (row.finite, row.enter) for r, row in members.items()}
            ring = self.rings.get(group)
            for r, (_, finite, enter) in (ring.reported(seq) if ring is not None else {}).items():
                flags.setdefault(r, (None if finite < 0 else bool(finite), enter))
            bad = [r for r, (f, _) in flags.items() if f is False]
            good = [r for r, (f, _) in flags.items() if f is True]
            if bad and good:
                row = next(iter(members.values()))
                candidates.append((min(flags[r][1] for r in bad), group, seq, row.op, bad, good, row.step))
        if not candidates:
            return []
        t, group, seq, op, bad, good, step = min(candidates, key=lambda c: c[0])
        action = "restart" if self.spec.nan == "rollback" else "skip"
        return [Incident("nan", sorted(bad), action, {
            "group": list(group), "seq": seq, "op": op, "finite_inputs": sorted(good),
            "nonfinite_inputs": sorted(bad), "policy": self.spec.nan}, fault_time=t, detected=now,
            step=step, group=list(group))]

    def _errors(self, now: float) -> list[Incident]:
        """Errors are not faults: a rank that raised one of pliant's input errors (its goodbye
        says "error: ..."), or the same exception on every rank, ends the job with its message:
        no restart, no rank blamed. Rerunning bad input on other machines fails the same way."""
        said = sorted((st.last_seen, st.rank, st.bye) for st in self.ranks.values() if st.bye)
        inputs = [(t, r, bye) for t, r, bye in said if bye.startswith("error: ")]
        if inputs:
            t, _, bye = inputs[0]
            return [Incident("error", [], "stop", {"why": "an input error (config, data, model or checkpoint)",
                                                   "message": bye[len("error: "):],
                                                   "raised_by": sorted(r for _, r, _ in inputs)},
                             fault_time=t, detected=now, step=self._step())]
        raised = [(t, r, bye) for t, r, bye in said if bye.startswith("exception: ")]
        if self.world > 1 and len(raised) == self.world and len({bye for _, _, bye in raised}) == 1:
            return [Incident("error", [], "stop", {"why": f"the same exception on all {self.world} ranks",
                                                   "message": raised[0][2][len("exception: "):],
                                                   "raised_by": sorted(r for _, r, _ in raised)},
                             fault_time=raised[0][0], detected=now, step=self._step())]
        return []

    def _crashes(self, now: float) -> list[Incident]:
        """Processes gone without saying goodbye; failing that, ranks that raised. A crash makes
        its peers' collectives fail too, so a silent death outranks the exceptions it causes."""
        silent = [st for st in self.ranks.values() if st.gone_at is not None and st.bye is None]
        raised = [st for st in self.ranks.values() if (st.bye or "").startswith("exception")]
        gone = silent or raised
        if not gone:
            return []
        if not silent and any(self._node_quiet(n, now) for n in self.nodes):
            return []  # ranks raised while a node fell quiet: the node is the suspect (_nodes_lost)
        when = {st.rank: st.gone_at if st in silent else st.last_seen for st in gone}
        first = min(when.values())
        settle = 0.25
        if not silent and self.nodes:  # several nodes: a peer's whole node may be gone (its
            settle = max(settle, 4 * self.spec.report_interval_s)  # agent falls quiet a little later)
        if not silent and len({st.bye for st in raised}) == 1 and now - first < self.spec.same_error_s:
            return []  # the same exception so far: the others may raise it too (_errors)
        if now - first < settle:
            return []  # ranks that fail together are reported together
        together = sorted(r for r, t in when.items() if t - first <= settle)
        ev = {str(r): {"pid": self.ranks[r].pid, "process": self.ranks[r].process, "said": self.ranks[r].bye,
                       "last_report_s_before_gone": round(when[r] - self.ranks[r].last_seen, 3),
                       "step": self.ranks[r].step} for r in together}
        waiting = {str(st.rank): [list(g) for g in st.inflight] for st in self.ranks.values()
                   if st.rank not in together and st.inflight}
        return [Incident("crash", together, "restart", {"processes": ev, "peers_waiting_in": waiting},
                         fault_time=min(self.ranks[r].last_seen for r in together), detected=now,
                         step=max(self.ranks[r].step for r in together), exclude=together)]

    def _working(self, rank: int, now: float) -> bool:
        """Has rank's main thread shown progress within the last progress_window_s?"""
        st = self.ranks.get(rank)
        stuck = None if st is None else st.stuck_for(now)
        return stuck is not None and stuck < self.spec.progress_window_s

    def _hangs(self, now: float) -> list[Incident]:
        s = self.spec
        groups: dict[tuple[int, ...], list[tuple[int, Row]]] = defaultdict(list)
        for st in self.ranks.values():
            for g, row in st.inflight.items():
                if row.op not in POINT_TO_POINT:
                    groups[g].append((st.rank, row))
        waiting_anywhere = {r for g, rows in groups.items() for r, _ in rows}
        comm, noncomm = [], []
        for g, waiting in groups.items():
            if len(g) < 2 or self._busy_checkpointing(g):
                continue
            if any(self._node_quiet(self.ranks[r].node, now) for r in g if r in self.ranks):
                continue  # what a quiet node's ranks last said is stale: _nodes_lost decides
            k = max(row.seq for _, row in waiting)
            at_k = [(r, row) for r, row in waiting if row.seq == k]
            ring = self.rings.get(g)
            done_k = (set(self.table.get((g, k), {})) | (ring.done_by(k) if ring is not None else set())) - \
                {r for r, _ in at_k}
            entered = {r for r, _ in at_k} | done_k
            rows = [row for _, row in at_k]
            since = min(row.enter for row in rows)
            limit = self.hang_threshold(g, rows)
            if now - since <= limit:
                continue
            ev = {"group": list(g), "seq": k, "op": rows[0].op, "waiting_s": round(now - since, 3),
                  "threshold_s": round(limit, 3), "entered": sorted(entered)}
            missing = sorted(set(g) - entered)
            if any(self.ranks[m].bye is not None for m in missing if m in self.ranks):
                continue  # a member said goodbye (it raised, or ended): the crash and error rules decide
            if not missing:
                # gloo's threads move a collective's bytes on the host; on CUDA (NCCL's proxy thread
                # spins) the device events decide, not the host's CPU
                if now - since < s.busy_silence_max_s and any(
                        self.ranks[r].device is None and self.ranks[r].moving(now, s.progress_window_s,
                                                                                s.moving_cpu_frac)
                        for r in g if r in self.ranks):
                    continue  # its bytes still move: a slow collective, not a hung one
                comm.append((len(g), g, since, ev, rows))
            elif not any(m in waiting_anywhere for m in missing):  # else the root is in the group they wait in
                if any(self._working(m, now) for m in missing) and now - since < s.busy_silence_max_s:
                    continue  # the late rank still computes: slow (the straggler rule's), not hung
                ev["not_entered"] = missing
                ev["culprit_state"] = {str(m): self._state(m, now) for m in missing}
                noncomm.append(Incident("noncomm_hang", missing, "restart", ev, fault_time=since, detected=now,
                                        step=min(row.step for row in rows), group=list(g), exclude=missing))
        if comm:  # the smallest hung group is the most specific: two ranks name a link
            _, g, since, ev, rows = min(comm, key=lambda c: c[0])
            link = list(g) if len(g) == 2 else None
            return [Incident("comm_hang", list(g), "restart", ev, fault_time=since, detected=now,
                             step=min(row.step for row in rows), group=list(g), link=link, exclude=list(g))]
        return noncomm[:1]

    def _state(self, rank: int, now: float) -> dict[str, Any]:
        st = self.ranks.get(rank)
        if st is None:
            return {"seen": False}
        return {"silent_s": round(now - st.last_seen, 3), "process": st.process, "step": st.step,
                **self._evidence(st, now)}

    def _nodes_lost(self, now: float) -> list[Incident]:
        """A node whose agent and every rank fell silent: the node is lost (its power, its
        network, every process on it killed), not one of its ranks."""
        for n, ns in sorted(self.nodes.items()):
            quiet, limit = now - ns.last_seen, self.silence_threshold(ns)
            mine = [st for st in self.ranks.values() if st.node == n]
            if ns.bye or quiet <= limit or not mine or all(st.bye is not None or st.gone_at is not None for st in mine) \
                    or any(now - st.last_seen <= limit for st in mine):
                continue  # left, not lost; or its ranks still speak
            ranks = sorted(st.rank for st in mine)
            return [Incident("node_lost", ranks, "restart", {
                "node": n, "host": ns.host, "node_agent_silent_s": round(quiet, 3), "threshold_s": round(limit, 3),
                "ranks_silent_s": {str(st.rank): round(now - st.last_seen, 3) for st in mine},
                "why": "the node's agent and all its ranks fell silent: the node is lost"},
                fault_time=ns.last_seen, detected=now, step=max(st.step for st in mine), exclude=ranks,
                exclude_nodes=[n])]
        return []

    def _silent(self, now: float) -> list[Incident]:
        for st in sorted(self.ranks.values(), key=lambda s: s.last_seen):
            if st.bye is not None or st.gone_at is not None or self._node_quiet(st.node, now):
                continue
            quiet = now - st.last_seen
            limit = self.silence_threshold(st)
            if quiet <= limit:
                continue
            outside = st.outside.since if st.outside is not None else None
            if st.process == "stopped":
                why = "process stopped (SIGSTOP or a debugger)"
            elif outside is not None:  # looked at from outside: does its main thread still work?
                idle = now - outside
                if idle < self.spec.progress_window_s and quiet < self.spec.busy_silence_max_s:
                    continue  # busy (start-up under load, a long call holding the GIL): slow, not hung
                why = (f"process alive, its main thread made no progress for {idle:.2f} s: holding the GIL or stuck "
                       f"in native code" if idle >= self.spec.progress_window_s else
                       "its main thread works but its agent was silent for busy_silence_max_s")
            elif st.process == "unknown":
                why = "on another host, no outside view: crashed or frozen"
            else:
                why = "process alive but silent, no progress evidence: holding the GIL or stuck in native code"
            return [Incident("noncomm_hang", [st.rank], "restart", {
                "silent_s": round(quiet, 3), "threshold_s": round(limit, 3), "process": st.process, "why": why,
                "inflight": [list(g) for g in st.inflight], **self._evidence(st, now)}, fault_time=st.last_seen,
                detected=now, step=st.step, exclude=[st.rank])]
        return []

    def _persist(self, key: tuple, now: float, inc: Incident) -> Incident:
        """Report a slow rank or node; once it has lasted isolate_after_s, isolate it."""
        since = self.flagged_since.setdefault(key, now)
        limit = self.spec.isolate_after_s
        inc.evidence["persisting_s"] = round(now - since, 3)
        if limit is not None and now - since >= limit and inc.ranks:
            inc.action, inc.exclude = "restart", list(inc.ranks)
        return inc

    def _stragglers(self, now: float) -> list[Incident]:
        s = self.spec
        current = self._step()
        done = sorted(step for step in self.step_delay if s.warmup_steps < step < current)
        for step in done[:-2 * s.straggler_window]:  # older steps never enter a window again
            del self.step_delay[step]
        window = done[-s.straggler_window:]
        if len(window) < s.straggler_window:
            return []
        tops = [max(self.step_delay[step].items(), key=lambda kv: kv[1])[0] for step in window]
        rank = max(set(tops), key=tops.count)
        share = tops.count(rank) / len(tops)
        n = len(window)  # (statistics.mean adds in fractions: most of the rule's cost)
        mine = sum(self.step_delay[step].get(rank, 0.0) for step in window) / n
        others = [sum(self.step_delay[step].get(r, 0.0) for step in window) / n
                  for r in range(self.world) if r != rank]
        rest = max(others) if others else 0.0
        chance = by_chance(tops.count(rank), len(tops), self.world)
        # a slow device is late by about the same every step; noise makes the last rank's lead
        # as often tiny as large (the gap between the largest two of a few random delays)
        least = min(self.step_delay[step].get(rank, 0.0) for step in window)
        if share < s.straggler_share or mine < s.straggler_min_s or mine < s.straggler_factor * rest or \
                chance > s.straggler_p or least < s.straggler_steady * mine:
            self.flagged_since.pop(("straggler", rank), None)
            return []
        inc = Incident("straggler", [rank], "report", {
            "steps": window, "last_to_arrive": tops, "share": round(share, 3), "mean_delay_s": round(mine, 4),
            "others_max_mean_delay_s": round(rest, 4), "least_delay_s": round(least, 4), "chance": chance},
            fault_time=now, detected=now, step=window[-1])
        inc = self._persist(("straggler", rank), now, inc)
        return [inc]

    def _links(self, now: float) -> list[Incident]:
        s = self.spec
        cells = {c: statistics.median(v) for c, v in self.link_latency.items() if len(v) >= s.link_samples}
        if len(cells) < 2:
            return []
        typical = statistics.median(cells.values())
        slow = {c for c, v in cells.items() if v > max(s.link_min_s, s.link_factor * typical)}
        if not slow or len(slow) * 2 > len(cells):
            return []
        out = []
        for node in sorted({c[0] for c in slow} | {c[1] for c in slow}):
            mine = [c for c in cells if node in c]
            if len(mine) >= 2 and all(c in slow for c in mine):  # a whole row / column: the node
                inc = Incident("slow_link", [node], "report", {
                    "cells_s": {f"{a}->{b}": round(cells[(a, b)], 5) for a, b in mine}, "typical_s": round(typical, 5),
                    "scope": "node"}, fault_time=now, detected=now, step=self._step())
                out.append(self._persist(("node", node), now, inc))
                slow -= set(mine)
        for a, b in sorted(slow):
            out.append(Incident("slow_link", [a, b], "report", {
                "cell_s": round(cells[(a, b)], 5), "typical_s": round(typical, 5), "samples": len(self.link_latency[(a, b)]),
                "scope": "link"}, fault_time=now, detected=now, step=self._step(), link=[a, b]))
        return out
