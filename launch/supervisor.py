"""Supervised training (docs/faults.md, "Response" and "Across nodes"): the fault monitor's
master and torchrun side by side, and the restart loop. On several nodes every node runs
one supervisor (`pliant train --node-rank I`); node 0's also runs the master, and each one
follows the master's decisions through its node agent (comm/monitor/node_agent.py).

    start the master (RUN/monitor/addr-a{n} tells the agents where it listens)
    start torchrun on the healthy slots (PLIANT_SLOTS, CUDA_VISIBLE_DEVICES on GPUs)
    wait: torchrun finishes                -> done
          an incident with action restart  -> compose and validate the next start first (its
                                              config and slots; a restart that cannot be built is
                                              written into the incident and ends the job with its
                                              reason), then stop the job (SIGTERM, then SIGKILL),
                                              mark the culprits' slots bad, start again with --resume
          an incident with action stop     -> the job's own error (a pliant input error, or the
                                              same exception on every rank): stop the job, mark
                                              nothing bad, end with the rank's message
          torchrun fails with no incident  -> give the master a moment to name a culprit,
                                              else restart without excluding anything
    a restart uses a spare slot (cluster.spare_devices_per_node), or with none left a smaller
    world on the healthy slots (faults.shrink, down to faults.min_world: a config overlay
    for the new world, the checkpoint loaded through DeepSpeed's universal form); at most
    faults.max_restarts restarts; the master dying leaves the job running, unmonitored.

Every start is written to RUN/monitor/supervisor.json.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import yaml

from pliant.comm.monitor.address import MONITOR_ADDR_ENV, MONITOR_ADDR_FILE_ENV
from pliant.comm.monitor.master import DECISIONS, MasterThread, address_file, read_incidents
from pliant.comm.monitor.node_agent import NodeAgent, NodeAgentError
from pliant.config import ConfigError, JobConfig, load_config
from pliant.launch.nodes import NodePlacement, interface_of
from pliant.launch.elastic import AFTER_ENV, process_tree, wait_gone
from pliant.launch.torchrun import config_args, preloaded, torchrun_command, torchrun_env
from pliant.io import atomic_write_text, strict_dumps

POLL_S = 0.1


@dataclass
class Attempt:
    attempt: int
    slots: list[int]
    world: int
    resume: bool
    started: float
    ended: float = 0.0
    rc: int | None = None
    outcome: str = ""  # finished, incident, failed, stopped
    incidents: list[dict] = field(default_factory=list)


def culprit_slots(attempt: int, slots: list[int], incidents: list[dict], per_node: int | None = None
                  ) -> dict[int, str]:
    """The slots the incidents exclude, each with why: a rank's slot as its agent reported it
    (else the start's slot of that rank), and every slot of an excluded node."""
    out: dict[int, str] = {}
    for i in incidents:
        reported = dict(zip(i["ranks"], i.get("slots") or []))
        for r in i["exclude"]:
            slot = reported.get(r)
            out[slots[r] if slot is None else slot] = f"{i['kind']} in start {attempt} (rank {r})"
        for n in i.get("exclude_nodes") or []:
            for slot in range(n * (per_node or 0), (n + 1) * (per_node or 0)):
                out[slot] = f"{i['kind']} in start {attempt} (node {n})"
    return out


class RestartError(RuntimeError):
    """A restart that cannot be built; the message says why (written into the incident)."""


@dataclass
class Start:
    """One start of the job, composed and validated before it is needed: the same on every
    node, since each composes it from the same config and the same incidents."""

    cfg: JobConfig
    names: list[str]
    slots: list[int]  # global slots (node x slots per node + local slot), node by node
    world: int
    nodes: list[int] = field(default_factory=lambda: [0])  # the nodes (indices in cluster.hosts) it runs on
    devices: int = 0  # ranks per node


def shrink_overlay(cfg: JobConfig, devices: int, hosts: list[str] | None = None) -> dict:
    """Config overlay for a smaller world (`devices` per node; on several nodes, the `hosts`
    left): bandwidth tables keep the group sizes that still fit, and the new world size takes
    the entry of the next larger size."""
    out: dict = {"cluster": {"devices_per_node": devices, "spare_devices_per_node": 0}}
    if hosts is not None:
        out["cluster"].update(nodes=len(hosts), hosts=list(hosts))
    world = devices * (len(hosts) if hosts is not None else cfg.cluster.nodes)
    bw = cfg.cluster.bandwidth
    tables = {}
    for name in ("all_to_all_gbps", "all_gather_gbps"):
        table = getattr(bw, name)
        if table is None:
            continue
        kept = {k: v for k, v in table.items() if k <= world}
        if world > 1 and world not in kept:
            kept[world] = table[min(k for k in table if k >= world)]
        tables[name] = dict(sorted(kept.items()))
    if tables:
        out["cluster"]["bandwidth"] = tables
    if cfg.train.static_degree is not None and cfg.train.static_degree > world:
        out["train"] = {"static_degree": world}
    return out


def kill_tree(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM torchrun and every process under it (its workers, its fork server, multiprocessing's
    resource tracker), then SIGKILL what is left (a frozen rank ignores SIGTERM until it runs
    again); `proc`, the supervisor's own child, is reaped once it has exited."""
    tree = process_tree(proc.pid)
    for sig in ("terminate", "kill"):
        for p in tree:
            try:
                getattr(p, sig)()
            except psutil.NoSuchProcess:
                pass
        tree = wait_gone(tree, grace_s if sig == "terminate" else 5.0)
        if not tree:
            break
    proc.poll()


class Supervisor:
    def __init__(self, cfg: JobConfig, config_names: list[str], module: str, module_args: list[str], run_dir: Path,
                 resume: bool = False, node: NodePlacement | None = None):
        self.cfg, self.config_names, self.module = cfg, list(config_names), module
        self.module_args, self.run_dir, self.resume = list(module_args), Path(run_dir), resume
        c = cfg.cluster
        if c.nodes > 1 and node is None:
            raise ConfigError(f"a {c.nodes}-node job needs this node's placement (--node-rank)")
        self.node = node or NodePlacement(0, list(c.hosts or ["127.0.0.1"]), "single node")
        self.multi = c.nodes > 1
        self.devices = c.devices_per_node
        self.per_node = c.devices_per_node + c.spare_devices_per_node
        self.slots = list(range(c.nodes * self.per_node))  # global: node x per_node + local slot
        self.bad: dict[int, str] = {}  # slot -> why
        self.attempts: list[Attempt] = []
        self.agent: NodeAgent | None = None
        self._prestarted: subprocess.Popen | None = None  # the next start's torchrun, started during a stop
        (self.run_dir / "monitor").mkdir(parents=True, exist_ok=True)

    @property
    def master_port(self) -> int:
        return self.cfg.faults.master_port or self.cfg.cluster.port + 1

    # ----- one start -----
    def _start_master(self, attempt: int, world: int) -> tuple[MasterThread, str | None]:
        """The master of this start, a thread of this process, listening when it returns. On one
        node the ranks read its address from its file when their imports are done (a torchrun
        started early, during the previous start's stop, cannot know it): the address is None.
        On several nodes it listens on the first host's address before any node agent registers."""
        try:
            master = MasterThread(self.run_dir, world, attempt, self.cfg.faults,
                                  bind=f"tcp://*:{self.master_port}" if self.multi else None,
                                  node=self.node.rank if self.multi else None, tick=master_faults())
        except RuntimeError as e:
            raise RuntimeError(f"{e} (faults.master_port: is the port in use?)") from None
        return master, (self.master_addr if self.multi else None)

    @property
    def master_addr(self) -> str:
        return f"tcp://{self.node.hosts[0]}:{self.master_port}"

    def _config_for(self, attempt: int, nodes: list[int], devices: int) -> tuple[JobConfig, list[str]]:
        if devices == self.devices and len(nodes) == self.cfg.cluster.nodes:
            return self.cfg, self.config_names
        hosts = [self.node.hosts[n] for n in nodes] if self.multi else None
        name = f"shrink-a{attempt}-n{self.node.rank}.yaml" if self.multi else f"shrink-a{attempt}.yaml"
        overlay = self.run_dir / "monitor" / name
        atomic_write_text(overlay, yaml.safe_dump(shrink_overlay(self.cfg, devices, hosts)))
        names = self.config_names + [str(overlay)]
        return load_config(names), names

    def _next_start(self, attempt: int, bad: dict[int, str]) -> "Start":
        """The config and slots of a start with `bad` slots excluded, composed and validated
        (raises RestartError naming why it cannot be built). With too few healthy slots on
        some node, the smaller world keeps the same ranks on every node it keeps (the largest
        such world; a node with no healthy slot left is dropped)."""
        spec = self.cfg.faults
        n_nodes, d, per = self.cfg.cluster.nodes, self.devices, self.per_node
        healthy = {n: [s for s in range(n * per, (n + 1) * per) if s not in bad] for n in range(n_nodes)}
        if all(len(h) >= d for h in healthy.values()):
            keep, devices = list(range(n_nodes)), d
        elif not healthy[0]:  # node 0 hosts the rendezvous store and the master: a job cannot go on without it
            raise RestartError(f"node 0 ({self.node.hosts[0]}), the rendezvous host that runs the fault monitor's "
                               f"master, has no healthy slot left (bad: {bad})")
        else:  # the largest world with the same ranks on every node kept; node 0 always kept
            _, devices = max((sum(len(h) >= k for h in healthy.values()) * k, k) for k in range(1, min(d, len(healthy[0])) + 1))
            keep = [n for n in range(n_nodes) if len(healthy[n]) >= devices]
        world, full = len(keep) * devices, n_nodes * d
        if world < full and (not spec.shrink or world < spec.min_world):
            allowed = f"faults.min_world is {spec.min_world}" if spec.shrink else "faults.shrink is off"
            left = sum(map(len, healthy.values()))
            raise RestartError(f"{left} healthy slot(s) left for a world of {full} (bad: {bad}) and "
                               f"{allowed}; add spare_devices_per_node to the cluster config")
        try:
            cfg, names = self._config_for(attempt, keep, devices)
        except ConfigError as e:
            raise RestartError(f"the config of a {world}-rank restart is invalid: {e}") from None
        if world < full:
            why = self._too_small(cfg)
            if why:
                raise RestartError(f"no spare slot left and {why}; add spare_devices_per_node to the cluster config")
        return Start(cfg, names, [s for n in keep for s in healthy[n][:devices]], world, keep, devices)

    def _annotate(self, attempt: int, note: dict) -> None:
        """Write what the supervisor made of a start's restart incidents into their files."""
        for path in sorted((self.run_dir / "incidents").glob(f"incident-a{attempt}-*.json")):
            body = json.loads(path.read_text())
            if body.get("action") == "restart" and "restart" not in body:
                atomic_write_text(path, strict_dumps({**body, "restart": note}, indent=1))

    @staticmethod
    def _too_small(cfg: JobConfig) -> str | None:
        """Why a smaller world cannot train this job (its longest sequence no longer fits), or None."""
        from pliant.planner.core import Planner

        if cfg.train.max_len is None:
            return None
        longest, size = Planner.from_specs(cfg.cluster, cfg.model, cfg.cost, cfg.planner).longest_supported()
        if longest >= cfg.train.max_len:
            return None
        return (f"a world of {cfg.cluster.world_size} holds sequences of at most {longest} tokens (in a group of "
                f"{size}), but train.max_len is {cfg.train.max_len}")

    def _torchrun(self, attempt: int, start: Start, addr: str | None, resume: bool, monitored: bool,
                  after: list[int] | None = None) -> subprocess.Popen:
        """This node's torchrun of one start; `after`: the processes of the failed start whose
        exit its rendezvous waits for (launch/elastic.py: started early, it preloads meanwhile)."""
        cfg = start.cfg
        args = config_args(start.names) + self.module_args + (["--resume"] if resume else [])
        mine = [s for s in start.slots if s // self.per_node == self.node.rank]
        # a slow torchrun monitor: the master names a crashed rank before torchrun stops its peers
        cmd = torchrun_command(cfg, start.nodes.index(self.node.rank), self.module, args, monitor_interval_s=0.5,
                               rdzv_id=f"{rendezvous_id(cfg)}-a{attempt}", local_addr=self.node.host)
        env = {**torchrun_env(cfg), "PLIANT_ATTEMPT": str(attempt), "PLIANT_SLOTS": ",".join(map(str, mine))}
        env.pop(MONITOR_ADDR_ENV, None)  # never an address inherited from whoever started pliant
        env.pop(MONITOR_ADDR_FILE_ENV, None)
        if addr:
            env[MONITOR_ADDR_ENV] = addr
        elif monitored:  # the master starts beside the job
            env[MONITOR_ADDR_FILE_ENV] = str(address_file(self.run_dir, attempt))
        if self.multi:
            env["PLIANT_NODE"] = str(self.node.rank)
            iface = interface_of(self.node)
            if iface:  # gloo and NCCL bind to the interface of this node's address, not the hostname's
                for var in ("GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
                    env.setdefault(var, iface)
        if cfg.cluster.device == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(s % self.per_node) for s in mine)
        if attempt > 0:
            env.pop("PLIANT_FAULT", None)  # injected faults belong to the first start
        if after:
            env[AFTER_ENV] = ",".join(map(str, after))
        return subprocess.Popen(cmd, env=env)

    def _decisions(self, attempt: int) -> list[dict]:
        """The master's decisions for this start (incidents with action restart or stop):
        through the node agent on several nodes, from the incident files on one."""
        if self.agent is not None:
            return list(self.agent.incidents)
        return [i for i in read_incidents(self.run_dir, attempt) if i["action"] in DECISIONS]

    def _wait(self, job: subprocess.Popen, master: MasterThread | None, attempt: int, slots: list[int]
              ) -> tuple[str, list[dict], "Start | RestartError | None"]:
        """How the start ended, its restart incidents, and for an incident the next start,
        composed and validated while the job still runs (or why there can be none)."""
        spec = self.cfg.faults
        master_warned = False
        failed_at = None
        # the master needs a few checks to name a culprit after the processes are gone (a lost
        # node: its silence threshold)
        patience = max(3.0, 10 * spec.check_interval_s, 2 * spec.heartbeat_min_s if self.multi else 0.0)
        follower = self.agent is not None and not self.node.first  # node 0 decides a restart with no culprit
        while True:
            rc = job.poll()
            if rc == 0:
                return "finished", [], None
            fatal = self._decisions(attempt)
            stops = [i for i in fatal if i["action"] == "stop"]
            if stops:  # the job's own error (bad input): stop it, no restart, no slot marked bad
                kill_tree(job, spec.stop_grace_s)
                return "stopped", stops, None
            if fatal:
                nxt = self._compose_restart(attempt, slots, fatal)
                if isinstance(nxt, Start) and not self.multi and preloaded():  # its preload overlaps the stop
                    self._prestarted = self._torchrun(attempt + 1, nxt, None, True, spec.enabled,
                                                      after=[p.pid for p in process_tree(job.pid)])
                kill_tree(job, spec.stop_grace_s)
                return "incident", fatal, nxt
            if follower and self.agent.moved_on:  # node 0 started the next start without a culprit: follow it
                kill_tree(job, spec.stop_grace_s)
                return "failed", [], None
            if rc is not None:
                failed_at = failed_at or time.monotonic()
                if follower:  # wait for node 0's decision while its master answers
                    if self.agent.master_lost:
                        return "failed", [], None
                elif (master is None and (self.agent is None or self.agent.master_lost)) or \
                        (master is not None and not master.alive()) or time.monotonic() - failed_at > patience:
                    return "failed", [], None
            if master is not None and not master.alive() and not master_warned:
                master_warned = True
                print(f"pliant: the fault monitor master stopped ({master.error}); training goes on "
                      f"unmonitored", file=sys.stderr, flush=True)
            time.sleep(POLL_S)

    def _compose_restart(self, attempt: int, slots: list[int], fatal: list[dict]) -> "Start | RestartError":
        """The next start after these incidents, or why there is none; written into the incidents."""
        bad = {**self.bad, **culprit_slots(attempt, slots, fatal, self.per_node)}
        try:
            if attempt >= self.cfg.faults.max_restarts:
                raise RestartError(f"restart budget spent: {self.cfg.faults.max_restarts} restart(s)")
            nxt: Start | RestartError = self._next_start(attempt + 1, bad)
            note = {"world": nxt.world, "slots": nxt.slots, "config": nxt.names}
            if self.multi:
                note["nodes"] = nxt.nodes
        except RestartError as e:
            nxt, note = e, {"error": str(e)}
        if self.node.first:  # the incident files are the master's, on the first node
            self._annotate(attempt, note)
        return nxt

    # ----- the loop -----
    def run(self) -> int:
        try:
            return self._loop()
        finally:
            if self._prestarted is not None:  # a restart started early that will not run
                kill_tree(self._prestarted, self.cfg.faults.stop_grace_s)
                self._prestarted = None

    def _loop(self) -> int:
        spec = self.cfg.faults
        attempt = 0
        try:
            nxt: Start | RestartError | None = self._next_start(0, self.bad)
        except RestartError as e:
            return self._give_up(str(e))
        while True:
            assert isinstance(nxt, Start)
            slots, world = nxt.slots, nxt.world
            for n in sorted(set(range(self.cfg.cluster.nodes)) - set(nxt.nodes)):  # a node left out stays out
                for slot in range(n * self.per_node, (n + 1) * self.per_node):
                    self.bad.setdefault(slot, f"node {n} left out of start {attempt}")
            if self.node.rank not in nxt.nodes:
                print(f"pliant: node {self.node.rank} ({self.node.host}) is left out of the restarted job "
                      f"(bad slots: {sorted(self.bad)}); the other nodes go on", file=sys.stderr, flush=True)
                self._save()
                return 0
            if world < self.devices * self.cfg.cluster.nodes:
                print(f"pliant: no spare slot left: restarting with a smaller world of {world} ranks (slots "
                      f"{slots})", file=sys.stderr, flush=True)
            resume = self.resume or attempt > 0
            record = Attempt(attempt, slots, world, resume, time.time())
            self.attempts.append(record)
            master, addr, job = None, None, None
            try:
                if spec.enabled and self.node.first:
                    master, addr = self._start_master(attempt, world)
                if spec.enabled and self.multi:
                    addr = self.master_addr
                    agent = NodeAgent(addr, self.node.rank, self.node.host, attempt, spec.report_interval_s,
                                      spec.master_timeout_s, spec.progress_cpu_s)
                    self.agent = agent.register(self.cfg.cluster.rendezvous_timeout_s)
                job, self._prestarted = self._prestarted or self._torchrun(attempt, nxt, addr, resume,
                                                                           master is not None), None
                if self.agent is not None:
                    self.agent.watch(job.pid)
                outcome, incidents, nxt = self._wait(job, master, attempt, slots)
            except NodeAgentError as e:
                return self._give_up(str(e))
            finally:
                if job is not None and job.poll() is None:
                    kill_tree(job, spec.stop_grace_s)
                if self.agent is not None:
                    self.agent.close()
                    self.agent = None
                if master is not None:
                    master.stop()
            record.ended, record.rc, record.outcome = time.time(), job.returncode, outcome
            record.incidents = incidents if self.multi and not self.node.first else read_incidents(self.run_dir,
                                                                                                      attempt)
            self._save()
            if outcome == "finished":
                return 0
            if outcome == "stopped":
                ev = incidents[0]["evidence"]
                print(f"pliant: the job stopped without a restart: {ev['why']} on rank(s) {ev['raised_by']}; no "
                      f"slot is marked bad. Incidents: {self.run_dir / 'incidents'}", file=sys.stderr, flush=True)
                print(f"pliant: error: {ev['message']}", file=sys.stderr, flush=True)
                return 2
            self.bad.update(culprit_slots(attempt, slots, incidents, self.per_node))
            if outcome == "failed":
                print(f"pliant: the job failed (status {job.returncode}) and the monitor named no culprit",
                      file=sys.stderr, flush=True)
                if attempt >= spec.max_restarts:
                    return self._give_up(f"restart budget spent: {spec.max_restarts} restart(s)")
                try:
                    nxt = self._next_start(attempt + 1, self.bad)
                except RestartError as e:
                    return self._give_up(str(e))
            if isinstance(nxt, RestartError):
                return self._give_up(f"{nxt} (written into the incident)")
            attempt += 1
            print(f"pliant: restart {attempt}/{spec.max_restarts} from the last complete checkpoint; bad slots: "
                  f"{sorted(self.bad) or 'none'}", file=sys.stderr, flush=True)

    def _give_up(self, why: str) -> int:
        self._save()
        print(f"pliant: giving up: {why}. Incidents: {self.run_dir / 'incidents'}", file=sys.stderr, flush=True)
        return 1

    def _save(self) -> None:
        body = {"slots": self.slots, "bad_slots": {str(k): v for k, v in self.bad.items()},
                "attempts": [asdict(a) for a in self.attempts]}
        name = f"supervisor-node{self.node.rank}.json" if self.multi and not self.node.first else "supervisor.json"
        atomic_write_text(self.run_dir / "monitor" / name, strict_dumps(body, indent=1))


def master_faults():
    """Fault injection's faults of the master (PLIANT_FAULT), or None in a normal run (which
    imports nothing for it)."""
    if not os.environ.get("PLIANT_FAULT"):
        return None
    from pliant.runtime.faults import MasterFaults, faults_from_env

    return MasterFaults(faults_from_env()) or None


def rendezvous_id(cfg: JobConfig) -> str:
    """The c10d rendezvous id every node of one job computes alike (per start, `-aN` is added)."""
    return f"pliant-{cfg.cluster.name}-{os.environ.get('SLURM_JOB_ID', 'job')}"
