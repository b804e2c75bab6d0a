"""Running a supervised job with injected faults (`pliant train` with PLIANT_FAULT), and
reading what it left behind: incidents, the injector's record of when each fault struck, the
supervisor's starts, the metrics and the final parameters. Used by tests/faults and by
`pliant bench faults`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

DETECT_S = 10.0  # the bound for detecting hangs and crashes on 4 CPU ranks


@dataclass
class Job:
    rc: int
    out: str
    run_dir: Path

    def _json(self, pattern: str) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.run_dir.glob(pattern))]

    @property
    def incidents(self) -> list[dict]:
        return self._json("incidents/incident-*.json")

    @property
    def fired(self) -> list[dict]:
        return self._json("faults/fired-*.json")

    @property
    def supervisor(self) -> dict:
        return json.loads((self.run_dir / "monitor" / "supervisor.json").read_text())

    @property
    def params(self) -> torch.Tensor:
        return torch.load(self.run_dir / "final_params.pt")

    @property
    def metrics(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []

    @property
    def steps(self) -> list[int]:
        return [m["step"] for m in self.metrics]

    def steps_so_far(self) -> list[int]:
        """The steps of a job still running (its last metrics line may be half-written)."""
        path = self.run_dir / "metrics.jsonl"
        out = []
        for line in path.read_text().splitlines() if path.is_file() else []:
            try:
                out.append(json.loads(line)["step"])
            except (ValueError, KeyError):
                pass
        return out

    def recovery(self) -> tuple[float | None, int | None]:
        """(seconds from the fault to the first step trained after the restart, steps of work
        lost: trained before the restart and trained again), or (None, None) without a restart."""
        attempts = self.supervisor["attempts"]
        if len(attempts) < 2 or not self.fired:
            return None, None
        restarted = attempts[1]["started"]
        before = [m["step"] for m in self.metrics if m["wall"] < restarted]
        after = [m for m in self.metrics if m["wall"] >= restarted]
        if not after:
            return None, None
        struck = min(f["wall"] for f in self.fired)
        return after[0]["wall"] - struck, max(before, default=0) - (after[0]["step"] - 1)

    def only_incident(self, kind: str) -> dict:
        found = [i for i in self.incidents if i["kind"] == kind]
        assert found, f"no {kind} incident; got {[(i['kind'], i['ranks']) for i in self.incidents]}\n" + self.tail()
        others = [(i["kind"], i["ranks"]) for i in self.incidents if i["kind"] != kind]
        assert not others, f"besides {kind}, also {others}"
        return found[0]

    def latency(self, incident: dict) -> float:
        """Seconds from the moment the fault struck (the injector's record) to detection."""
        struck = min(f["wall"] for f in self.fired if f["attempt"] == incident["attempt"])
        return incident["detected_wall"] - struck

    def tail(self, n: int = 4000) -> str:
        return self.out[-n:]


def write_overlay(path: Path, overlay: dict) -> Path:
    path.write_text(yaml.safe_dump(overlay))
    return path


def command(run_dir: Path, config: Path, overlay: dict | None = None) -> list[str]:
    configs = [str(config)]
    if overlay:
        configs.append(str(write_overlay(run_dir.parent / f"{run_dir.name}-overlay.yaml", overlay)))
    cmd = [sys.executable, "-m", "pliant.launch.cli", "train", "--run-dir", str(run_dir), "--save-params"]
    for c in configs:
        cmd += ["--config", c]
    return cmd


def environment(faults: list[dict]) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PLIANT_PG_TIMEOUT_S": "120"}
    env.pop("PLIANT_FAULT", None)
    if faults:
        env["PLIANT_FAULT"] = json.dumps(faults)
    return env


def run_job(tmp_path: Path, name: str, config: Path, faults: list[dict] = (), overlay: dict | None = None,
            timeout: float = 400) -> Job:
    run_dir = tmp_path / name
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(command(run_dir, config, overlay), capture_output=True, text=True, timeout=timeout,
                       env=environment(list(faults)))
    return Job(r.returncode, r.stdout + r.stderr, run_dir)


def two_node_overlay(nodes, port: int, overlay: dict | None = None) -> dict:
    """The fault config on two nodes of 2 ranks and one spare slot each, at the nodes' addresses."""
    out = {"cluster": {"nodes": 2, "devices_per_node": 2, "spare_devices_per_node": 1, "port": port,
                       "hosts": [n.addr for n in nodes], "rendezvous_timeout_s": 60}}
    for section, values in (overlay or {}).items():
        out.setdefault(section, {}).update(values)
    return out


def run_two_node_job(work: Path, name: str, config: Path, nodes, faults: list[dict] = (), overlay: dict | None = None,
                     port: int = 29400, timeout: float = 400, kill_node_at_step: int | None = None) -> Job:
    """A real 2-node job: `pliant train --node-rank I` in each node's network namespace
    (bench/netns.py), gloo bound by pliant to the node's interface. With `kill_node_at_step`,
    every process of node 1 is killed once the job's metrics reach that step (a node lost)."""
    import time

    run_dir = work / name
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = command(run_dir, config, two_node_overlay(nodes, port, overlay))
    # pliant, not the harness, must bind gloo to the node's interface
    env = {**environment(list(faults)), "GLOO_SOCKET_IFNAME": None, "TP_SOCKET_IFNAME": None}
    logs = [run_dir.parent / f"{name}-node{i}.log" for i in range(len(nodes))]
    procs = [node.popen(cmd + ["--node-rank", str(i)], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
             for i, (node, log) in enumerate(zip(nodes, logs))]
    deadline = time.monotonic() + timeout
    killed = kill_node_at_step is None
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if not killed and max(Job(0, "", run_dir).steps_so_far(), default=0) >= kill_node_at_step:
            nodes[1].kill_all()
            killed = True
        time.sleep(0.2)
    for node in nodes:
        node.kill_all()
    rcs = [p.returncode if p.returncode is not None else -9 for p in procs]
    outs = [f"===== node {i} (rc {rc})\n{log.read_text()}" for i, (rc, log) in enumerate(zip(rcs, logs))]
    # a node killed on purpose is not the job's status: node 0's is
    rc = rcs[0] if kill_node_at_step is not None else max(map(abs, rcs))
    return Job(rc, "\n".join(outs), run_dir)
