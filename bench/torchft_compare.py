"""torchft side by side (`pliant bench faults`): a crashed and a hung replica in a torchft job
of three replica groups (one process each, gloo, a torchft lighthouse as users run it, its
default timeouts), and how long the survivors take to notice and whether anything names the
culprit.

"Noticed" is the first step a survivor finishes after the fault with the fault visible (the
step dropped by should_commit, an error held by its Manager, or a smaller quorum), or a
survivor failing with an error, whichever comes first. "Names the culprit" is whether the
culprit's replica id appears in that error; "dropped from quorum" is whether the lighthouse issued a quorum
without it after the fault (the culprit found by elimination, not named).
"""
from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPLICAS = 3
CULPRIT = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


@dataclass
class TorchftRun:
    fault: str
    noticed_s: float | None
    names_culprit: bool
    dropped_from_quorum_s: float | None
    evidence: str
    survivors_finished: bool

    def to_dict(self) -> dict:
        return vars(self)


def run_once(work: Path, fault: str, steps: int, fault_step: int, timeout_s: float) -> TorchftRun:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    binary = shutil.which("torchft_lighthouse", path=str(Path(sys.executable).parent)) or "torchft_lighthouse"
    port = free_port()
    lh_log = (work / "lighthouse.log").open("w")
    lighthouse = subprocess.Popen([binary, "--min_replicas", "2", "--bind", f"[::]:{port}"], stdout=lh_log,
                                  stderr=subprocess.STDOUT)
    procs = []
    try:
        time.sleep(0.5)
        for r in range(REPLICAS):
            cmd = [sys.executable, "-m", "pliant.bench.torchft_replica", "--replica", str(r), "--lighthouse",
                   f"http://localhost:{port}", "--log", str(work / f"r{r}.jsonl"), "--steps", str(steps),
                   "--fault", fault if r == CULPRIT else "none", "--fault-step", str(fault_step)]
            procs.append(subprocess.Popen(cmd, stdout=(work / f"r{r}.out").open("w"), stderr=subprocess.STDOUT,
                                          env={**os.environ, "OMP_NUM_THREADS": "1"}))
        deadline = time.monotonic() + timeout_s
        survivors = [p for r, p in enumerate(procs) if r != CULPRIT]
        exited: dict[int, float] = {}
        while time.monotonic() < deadline and len(exited) < len(survivors):
            for r, p in enumerate(procs):
                if r != CULPRIT and r not in exited and p.poll() is not None:
                    exited[r] = time.time()
            time.sleep(0.1)
        finished = all(p.poll() == 0 for p in survivors)
    finally:
        for p in procs + [lighthouse]:
            if p.poll() is None:
                p.kill()
            p.wait()
        lh_log.close()
    fired = [row for row in read_rows(work / f"r{CULPRIT}.jsonl") if "fired" in row]
    if not fired:
        raise RuntimeError(f"torchft {fault}: the fault never fired; see {work}")
    struck = fired[0]["wall"]
    noticed, said = None, []
    for r in range(REPLICAS):
        if r == CULPRIT:
            continue
        for row in read_rows(work / f"r{r}.jsonl"):
            if row["wall"] > struck and (not row["committed"] or row["error"] or row["participants"] < REPLICAS):
                if noticed is None or row["wall"] - struck < noticed:
                    noticed = row["wall"] - struck
                said.append(f"replica_{r}: step {row['step']} committed={row['committed']} "
                            f"participants={row['participants']} error={row['error']}")
                break
        if procs[r].returncode not in (0, None) and r in exited:
            error = last_line(work / f"r{r}.out")
            if noticed is None or exited[r] - struck < noticed:
                noticed = exited[r] - struck
            said.append(f"replica_{r}: failed (rc {procs[r].returncode}) error={error}")
    named = any(f"replica_{CULPRIT}" in x.split("error=", 1)[1] for x in said)
    dropped = quorum_without_culprit(work / "lighthouse.log", struck)
    return TorchftRun(fault, noticed, named, dropped, "; ".join(said)[:1200], finished)


def last_line(path: Path) -> str:
    lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
    return lines[-1][:400] if lines else ""


QUORUM = re.compile(r"^(\S+) .*Quorum! Quorum \{ quorum_id: \d+, participants: (.*)")


def quorum_without_culprit(log: Path, struck: float) -> float | None:
    """Seconds from the fault to the first quorum the lighthouse issued without the culprit."""
    for line in log.read_text(errors="replace").splitlines():
        m = QUORUM.match(line)
        if not m:
            continue
        at = datetime.datetime.fromisoformat(m.group(1)).timestamp()  # the lighthouse logs local time
        if at > struck and f'"replica_{CULPRIT}:' not in m.group(2):
            return at - struck
    return None


FAULTS = ("crash", "hang")


def measure(work: Path, repeats: int, faults: tuple[str, ...] = FAULTS, steps: int = 30, fault_step: int = 6,
            timeout_s: float = 240) -> dict:
    out = {}
    for fault in faults:
        runs = [run_once(work / f"torchft-{fault}-{i}", fault, steps, fault_step, timeout_s) for i in range(repeats)]
        for i, r in enumerate(runs):
            print(f"  torchft {fault} #{i}: noticed after {r.noticed_s} s, names the culprit: {r.names_culprit}",
                  flush=True)
        noticed = [r.noticed_s for r in runs if r.noticed_s is not None]
        dropped = [r.dropped_from_quorum_s for r in runs if r.dropped_from_quorum_s is not None]
        out[fault] = {"noticed_s": statistics.median(noticed) if noticed else None,
                      "names_culprit": all(r.names_culprit for r in runs),
                      "dropped_from_quorum_s": statistics.median(dropped) if len(dropped) == len(runs) else None,
                      "runs": [r.to_dict() for r in runs]}
    out["settings"] = {"replica_groups": REPLICAS, "min_replicas": 2, "manager_timeout_s": 60,
                       "lighthouse_heartbeat_timeout_ms": 5000, "lighthouse_join_timeout_ms": 60000,
                       "note": "torchft 0.2.0 defaults"}
    return out
