"""The learner group as the driver runs it: W Learner actors in one placement group, started,
built from the warm start, restored from a checkpoint, run, and, when a rank fails, replaced
by a new *generation* that goes on from the newest complete checkpoint (docs/faults.md,
"The RL learner"). The rollout, reward and reference workers and the queue stay.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pliant.comm.monitor.master import MasterThread, read_incidents
from pliant.planner.errors import InputError
from pliant.runtime.checkpoint import complete_checkpoints
from pliant.runtime.faults import FAULT_ENV

from .board import ProgressBoard
from .common import log
from .dispatch import partition_of
from .learner import Learner, learner_cluster
from .resume import ResumePoint
from .spec import RLResourceError

PLACEMENT_TIMEOUT_S = 60.0
NAMING_PATIENCE_S = 3.0  # after Ray reports a rank dead, how long the master may take to name it


def start_learners(cfg, task, seed: int, generation: int = 0, monitor_addr: str | None = None,
                   run_dir: str | None = None) -> tuple[list, Any]:
    """The learner group: W actors placed together (a placement group of one bundle per rank,
    packed on as few nodes as fit), joined into one process group. A group Ray cannot place
    is a clear error, not a wait."""
    res = cfg.resources.learner
    learner_cluster(cfg)  # a bad learner section fails here, clearly, not in the actors
    bundle = {"CPU": res.num_cpus, **({"GPU": res.num_gpus} if res.num_gpus else {})}
    pg = placement_group([bundle] * res.world, strategy="PACK")
    try:
        ray.get(pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise RLResourceError(f"resources.learner: {res.world} ranks of {bundle} could not be placed on the Ray "
                              f"cluster within {PLACEMENT_TIMEOUT_S:g} s (cluster: {ray.cluster_resources()}, "
                              f"free: {ray.available_resources()})") from None
    learners = [Learner.options(num_cpus=res.num_cpus, num_gpus=res.num_gpus,
                                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r)
                                ).remote(r, cfg, task, seed, generation) for r in range(res.world)]
    addr, port = ray.get(learners[0].address.remote())
    faults = os.environ.get(FAULT_ENV, "")  # injected faults travel with the call (a cluster's workers do not share our env)
    ray.get([a.join.remote(addr, port, monitor_addr, faults, run_dir) for a in learners])
    return learners, pg


def start_master(run_dir: Path, world: int, attempt: int, spec) -> tuple[MasterThread, str]:
    """The fault monitor's master for one learner generation, a thread of the driver, bound on
    every interface: the address the learner ranks' agents connect to."""
    master = MasterThread(run_dir, world, attempt, spec, bind="tcp://*:*")
    return master, f"tcp://{ray.util.get_node_ip_address()}:{master.address.rsplit(':', 1)[1]}"


def describe(incident: dict) -> str:
    """An incident as one line: its class, the learner ranks it names, its evidence's keys."""
    return (f"the fault monitor named learner rank(s) {incident.get('ranks')}: {incident.get('kind')} "
            f"(evidence: {', '.join(sorted(incident.get('evidence', {})))})")


def newest_point(run_dir: Path | None) -> ResumePoint | None:
    """The newest complete checkpoint of this run (it is this run's: no identity check)."""
    done = complete_checkpoints(Path(run_dir) / "checkpoints") if run_dir else []
    if not done:
        return None
    meta = json.loads((done[-1] / "meta.json").read_text())
    return ResumePoint(done[-1], int(meta["version"]), int(meta["world_size"]), meta)


@dataclass
class LearnerGroup:
    cfg: Any
    task: Any
    seed: int
    state_ref: Any  # the warm start (every generation is built from it, then restored)
    sync: bool
    run_dir: str | None  # checkpoints go here (None: none)
    run_meta: dict[str, Any]
    generation: int = 0
    monitored: bool = False  # run the fault monitor's master and agents (faults.enabled, with a run directory)
    master: Any = None
    actors: list = field(default_factory=list)
    pg: Any = None
    refs: list = field(default_factory=list)
    board: Any = None

    @property
    def lead(self):
        return self.actors[0]

    def start(self) -> None:
        """This generation's ranks placed and joined (and its fault monitor master started)."""
        addr = None
        if self.monitored:
            self.master, addr = start_master(Path(self.run_dir), self.cfg.resources.learner.world, self.generation,
                                             self.cfg.faults)
        self.actors, self.pg = start_learners(self.cfg, self.task, self.seed, self.generation, addr, self.run_dir)

    def build(self, point: ResumePoint | None = None) -> None:
        """Every rank's engine from the warm start, then the checkpoint's state (if any)."""
        ray.get([a.build.remote(self.state_ref) for a in self.actors])
        if point is not None:
            ray.get([a.restore.remote(str(point.path), point.world_size) for a in self.actors])

    def run(self, tq, store) -> None:
        self.board = ProgressBoard.remote()
        self.refs = [a.run.remote(tq, store, self.sync, self.run_dir, self.run_meta, self.board)
                     for a in self.actors]

    def progress(self, since: int) -> tuple[list[dict[str, Any]], bool]:
        return ray.get(self.board.read.remote(since))

    def failure(self) -> str | None:
        """What went wrong with a rank, if anything: an incident of the fault monitor (a crash,
        a hang, a stopped or GIL-holding rank, named with its evidence), a rank that raised
        or died, or one of ranks 1..W-1 that ended while rank 0 goes on."""
        named = self._incident()
        if named is not None:
            return named
        failed = self._ray_failure()
        if failed is not None and self.monitored:  # Ray noticed first: give the master a moment to name the culprit
            deadline = time.monotonic() + NAMING_PATIENCE_S
            while time.monotonic() < deadline:
                named = self._incident()
                if named is not None:
                    return named
                time.sleep(0.1)
        return failed

    def _incident(self) -> str | None:
        """The master's restart decision, described; its stop decision (the job's own error, such
        as bad input: no restart) raised as an InputError with the rank's message."""
        if self.monitored:
            for inc in read_incidents(Path(self.run_dir), self.generation):
                if inc.get("action") == "stop":
                    raise InputError(f"learner: {inc['evidence']['message']} ({inc['evidence']['why']} on rank(s) "
                                     f"{inc['evidence']['raised_by']}; not restarted)")
                if inc.get("action") == "restart":
                    return describe(inc)
        return None

    def _ray_failure(self) -> str | None:
        ready, _ = ray.wait(self.refs, num_returns=len(self.refs), timeout=0)
        lead_done = self.refs[0] in ready
        for r, ref in enumerate(self.refs):
            if ref not in ready:
                continue
            try:
                ray.get(ref)
            except Exception as e:  # noqa: BLE001 (a rank's failure, whatever it is, is reported and acted on)
                return f"learner rank {r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if r and not lead_done:
                return f"learner rank {r} stopped before the last step"
        return None

    def stop(self) -> None:
        if self.master is not None:
            self.master.stop()  # it writes what it saw to RUN/monitor/master-a{generation}.json
            self.master = None
        for a in [*self.actors, *([self.board] if self.board is not None else [])]:
            ray.kill(a)
        if self.pg is not None:
            remove_placement_group(self.pg)
        self.actors, self.pg, self.refs, self.board = [], None, [], None

    def restart(self, tq, dispatcher, store, steps: int) -> ResumePoint | None:
        """Replace the group by the next generation from the newest complete checkpoint (the
        warm start when there is none): the old generation's queue partitions from there on
        are cleared (their late writes dropped), the dispatcher rewinds, and the new group
        runs. Returns the checkpoint it went on from."""
        self.stop()
        point = newest_point(self.run_dir)
        version = point.version if point else 0
        old, self.generation = self.generation, self.generation + 1
        for step in range(version, steps):
            tq.clear_partition(partition_of(old, step))
        ray.get(dispatcher.rewind.remote(version, self.generation))
        log(f"learner generation {self.generation}: from {point.path.name if point else 'the warm start'} "
            f"(step {version})")
        self.start()
        self.build(point)
        self.run(tq, store)
        return point
