"""One `pliant rl` run with a fault injected into a learner rank, and what it left behind:
the fault monitor's incidents (per learner generation), the injector's record of when the
fault struck, the metrics rows and the summary. Used by `pliant bench faults --rl` and by
tests/test_rl_faults.py.

The job: configs/rl-local.yaml made small (7 GRPO steps of 4 prompt groups, a checkpoint every
2 steps), async with k = 1, a learner of 2 ranks under ZeRO 1; the fault strikes rank 1 at
step 4.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from pliant.comm.monitor.master import read_incidents
from pliant.runtime.faults import FAULT_ENV

STEPS, PROMPTS, STALENESS, FAULT_RANK, FAULT_STEP = 7, 4, 1, 1, 4
SMALL = {"model": {"zero_stage": 1},
         "rl": {"steps": STEPS, "prompts_per_step": PROMPTS, "group_size": 4, "micro_batch_groups": 2,
                "rollout_slots": 8, "sft_steps": 10, "eval_prompts": 0, "checkpoint_every": 2, "keep_checkpoints": 8},
         "task": {"max_digits": 12},
         "resources": {"learner": {"world": 2, "num_cpus": 0.5}},
         # the master's per-collective baselines need clean steps before the fault (with 2
         # warm-up steps and a fault at step 3 a hang waited for the warm-up threshold, 120 s)
         "faults": {"warmup_steps": 1}}
# class -> (injected fault kind, the incident kind that must name it)
RL_CLASSES: dict[str, tuple[str, str]] = {"crash": ("crash", "crash"),
                                          "noncomm_hang": ("hang_before_collective", "noncomm_hang"),
                                          "sigstop": ("sigstop", "noncomm_hang")}


@dataclass
class RLJob:
    rc: int
    out: str
    run_dir: Path

    @property
    def incidents(self) -> list[dict]:
        return read_incidents(self.run_dir)

    def restart_incident(self) -> dict | None:
        """The first generation's incident that restarted the learner group."""
        found = [i for i in read_incidents(self.run_dir, 0) if i["action"] == "restart"]
        return found[0] if found else None

    @property
    def fired(self) -> dict | None:
        found = sorted((self.run_dir / "faults").glob("fired-a0-*.json"))
        return json.loads(found[0].read_text()) if found else None

    @property
    def rows(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []

    @property
    def summary(self) -> dict:
        path = self.run_dir / "summary.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def latency(self, incident: dict) -> float:
        """Seconds from the moment the fault struck (the injector's record) to the incident."""
        return incident["detected_wall"] - self.fired["wall"]

    def groups_once(self) -> bool:
        """Every prompt group trained exactly once over the steps the run kept."""
        return sorted(g for x in self.rows for g in x["groups"]) == list(range(STEPS * PROMPTS))

    def max_staleness(self) -> int | None:
        return max((x["max_staleness"] for x in self.rows), default=None)

    def restarted_from(self) -> int | None:
        """The step the learner's next generation went on from (its checkpoint's), from the log."""
        for line in self.out.splitlines():
            if "learner generation 1: from" in line and "(step " in line:
                return int(line.rsplit("(step ", 1)[1].split(")")[0])
        return None

    def tail(self, n: int = 4000) -> str:
        return self.out[-n:]


def run_rl_job(work: Path, name: str, config: Path, kind: str | None, timeout: float = 540) -> RLJob:
    """`pliant rl` (async, k = 1) on `config` made small, with `kind` injected into learner
    rank 1 at step 4 (None: a clean run)."""
    run_dir = work / name
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    overlay = run_dir.parent / f"{name}-overlay.yaml"
    overlay.write_text(yaml.safe_dump(SMALL))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(FAULT_ENV, None)
    if kind is not None:
        env[FAULT_ENV] = json.dumps({"kind": kind, "rank": FAULT_RANK, "step": FAULT_STEP})
    cmd = [sys.executable, "-m", "pliant.launch.cli", "rl", "--config", str(config), "--config", str(overlay),
           "--mode", "async", "--staleness", str(STALENESS), "--run-dir", str(run_dir)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return RLJob(r.returncode, r.stdout + r.stderr, run_dir)
