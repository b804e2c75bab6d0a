"""`pliant bench startup`: how long a job takes to start, and to come back after a crash.

* one-step job: `pliant train --config CONFIG --steps 1`, wall time from the command to its
  exit, with rank 0's start-up marks (RUN/startup-a0.json: process started, imports done,
  trainer built, first step done) relative to the command;
* restart: the fault config's job with rank 1 SIGKILLed at step 3 (torchrun, supervisor,
  spare slots), from the crash (RUN/faults/fired-*.json) to the incident, to the job stopped
  (supervisor.json) and to the first step after the restart (the restarted start's marks).

Medians over `repeats` runs, written as JSON and printed as a table.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pliant.io import atomic_write_text, strict_dumps

PHASES = ("process", "imports", "trainer", "resumed", "first_step")


def _marks(run_dir: Path, attempt: int, origin: float) -> dict[str, float]:
    path = run_dir / f"startup-a{attempt}.json"
    if not path.is_file():
        return {}
    marks = json.loads(path.read_text())
    return {k: round(marks[k] - origin, 3) for k in PHASES if k in marks}


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[subprocess.CompletedProcess, float, float]:
    t0, w0 = time.monotonic(), time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    return r, time.monotonic() - t0, w0


def one_step_job(config: str, run_dir: Path, timeout: float = 300) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pliant.launch.cli", "train", "--config", config, "--steps", "1",
           "--run-dir", str(run_dir)]
    r, seconds, w0 = _run(cmd, {**os.environ}, timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (status {r.returncode}):\n{r.stderr[-3000:]}")
    return {"seconds": round(seconds, 3), "marks": _marks(run_dir, 0, w0)}


def crash_restart_job(config: str, run_dir: Path, step: int = 3, rank: int = 1, timeout: float = 400
                      ) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pliant.launch.cli", "train", "--config", config, "--run-dir", str(run_dir)]
    env = {**os.environ, "PLIANT_FAULT": json.dumps([{"kind": "crash", "rank": rank, "step": step}])}
    r, seconds, _ = _run(cmd, env, timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (status {r.returncode}):\n{r.stderr[-3000:]}")
    fired = [json.loads(p.read_text()) for p in (run_dir / "faults").glob("fired-*.json")]
    crash = min(f["wall"] for f in fired)
    marks = _marks(run_dir, 1, crash)  # the restarted start's, from the crash
    incidents = [json.loads(p.read_text()) for p in (run_dir / "incidents").glob("incident-*.json")]
    detected = min(i["detected_wall"] for i in incidents)
    supervisor = json.loads((run_dir / "monitor" / "supervisor.json").read_text())
    restarted = supervisor["attempts"][1]["started"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    first = min(row["wall"] for row in rows if row["wall"] > restarted)  # its first step's metrics row
    return {"seconds": round(seconds, 3), "crash_to_first_step_s": round(first - crash, 3),
            "crash_to_detected_s": round(detected - crash, 3),
            "crash_to_stopped_s": round(supervisor["attempts"][0]["ended"] - crash, 3), "marks": marks}


def _median_marks(runs: list[dict]) -> dict[str, float]:
    keys = [k for k in PHASES if all(k in r["marks"] for r in runs)]
    return {k: round(statistics.median(r["marks"][k] for r in runs), 3) for k in keys}


def run(config: str, fault_config: str, out: Path, repeats: int = 3, work: Path | None = None) -> dict[str, Any]:
    import tempfile

    work = Path(work) if work else Path(tempfile.mkdtemp(prefix="pliant-bench-startup-"))
    work.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    one = [one_step_job(config, work / f"{stamp}-one-{i}") for i in range(repeats)]
    restart = [crash_restart_job(fault_config, work / f"{stamp}-crash-{i}") for i in range(repeats)]
    body = {
        "config": config, "fault_config": fault_config, "repeats": repeats,
        "one_step_job_s": round(statistics.median(r["seconds"] for r in one), 3),
        "one_step_marks_s": _median_marks(one),
        "crash_to_first_step_s": round(statistics.median(r["crash_to_first_step_s"] for r in restart), 3),
        "crash_to_detected_s": round(statistics.median(r["crash_to_detected_s"] for r in restart), 3),
        "crash_to_stopped_s": round(statistics.median(r["crash_to_stopped_s"] for r in restart), 3),
        "restart_marks_s": _median_marks(restart),
        "runs": {"one_step": one, "restart": restart},
    }
    atomic_write_text(out, strict_dumps(body, indent=1))
    print_table(body)
    return body


def print_table(body: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"start-up ({body['repeats']} runs each, medians, seconds)")
    t.add_column("measure")
    t.add_column("seconds", justify="right")
    t.add_row("one-step job, command to exit", f"{body['one_step_job_s']:.2f}")
    for k, v in body["one_step_marks_s"].items():
        t.add_row(f"  rank 0 {k} (from the command)", f"{v:.2f}")
    t.add_row("crash to detected", f"{body['crash_to_detected_s']:.2f}")
    t.add_row("crash to the job stopped", f"{body['crash_to_stopped_s']:.2f}")
    t.add_row("crash to the first step after the restart", f"{body['crash_to_first_step_s']:.2f}")
    for k, v in body["restart_marks_s"].items():
        t.add_row(f"  restarted rank 0 {k} (from the crash)", f"{v:.2f}")
    Console().print(t)
