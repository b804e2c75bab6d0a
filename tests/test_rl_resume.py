"""`pliant rl --resume`: a run killed whole (SIGKILL of the driver and every process it
started: Ray's, the learner's, the rollout's) after a checkpoint goes on from it.

- sync: the resumed run trains every step once, each on the groups the uninterrupted run
  trained at it, and the checkpoint's steps on the same samples;
- async, resumed on a learner of another world (2 ranks -> 1, DeepSpeed's universal form):
  every prompt group is trained exactly once over the kept and the resumed steps, none more
  than k versions stale;
- bad input: no checkpoint, a torn one, one of another config or of `pliant train`, a run
  with nothing left to train: clear errors, nothing overwritten.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from test_cli import pliant

pytestmark = pytest.mark.timeout(900)
ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
SMALL = {"rl": {"steps": STEPS, "prompts_per_step": 4, "group_size": 4, "micro_batch_groups": 2, "rollout_slots": 8,
                "sft_steps": 10, "eval_prompts": 16, "checkpoint_every": 2, "keep_checkpoints": 8},
         "task": {"max_digits": 12},
         # the planner's search ends by itself (a small batch: milliseconds), not at a deadline
         # that a loaded machine may reach first (its best plan so far then depends on the load)
         "learner": {"planner": {"time_limit_s": 60.0}}}


def overlay(tmp_path: Path, extra: dict | None = None) -> str:
    from pliant.config import merge_config

    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(merge_config(SMALL, extra or {})))
    return str(path)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc: Ray's node processes and workers included)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_run_after(args: list[str], ckpt: Path, timeout: float = 400) -> None:
    """Start `pliant rl ARGS`, and SIGKILL it and everything it started as soon as `ckpt` is
    complete."""
    proc = subprocess.Popen([sys.executable, "-m", "pliant.launch.cli", "rl", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not (ckpt / "COMPLETE").is_file():
            assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {ckpt.name}:\n" + \
                proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, f"no {ckpt.name} within {timeout} s"
            time.sleep(0.05)
    finally:
        tree = [proc.pid, *descendants(proc.pid)]
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(30)
        proc.stderr.close()


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def exported(tmp_path: Path, run_dir: Path, name: str) -> dict:
    from safetensors.torch import load_file

    out = tmp_path / name
    r = pliant("export", "--run-dir", str(run_dir), "--step", str(STEPS), "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    state = {}
    for f in sorted(out.glob("*.safetensors")):
        state.update(load_file(f))
    assert state
    return state


def test_a_killed_sync_run_resumed_goes_on_from_its_checkpoint(tmp_path):
    """Killed after step-2, resumed: every step trained once, each on the groups the
    uninterrupted run trained at it, the kept steps' rows those of the killed run itself, and
    the last parameters bit-identical to the uninterrupted run's."""
    small = overlay(tmp_path)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    args = ["--config", "configs/rl-local.yaml", "--config", small, "--mode", "sync"]
    r = pliant("rl", *args, "--run-dir", str(whole), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    kill_run_after([*args, "--run-dir", str(killed)], killed / "checkpoints" / "step-00000002")
    left = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert "step-00000002" in left and f"step-{STEPS:08d}" not in left, left  # killed mid-run
    before = {x["step"]: x for x in metrics_rows(killed) if x["step"] < 2}
    r = pliant("rl", *args, "--run-dir", str(killed), "--resume", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    summary = json.loads((killed / "summary.json").read_text())
    point = summary["resumed_from"]
    assert 2 <= point < STEPS and summary["samples"] == (STEPS - point) * 16
    rows, ref = metrics_rows(killed), metrics_rows(whole)
    assert [x["step"] for x in rows] == list(range(STEPS))
    assert [x["groups"] for x in rows] == [x["groups"] for x in ref]
    assert [x["tokens"] for x in rows[:point]] == [x["tokens"] for x in ref[:point]]  # the same samples
    assert all(rows[s] == before[s] for s in before)  # rows the killed driver wrote, kept as they were
    mine, want = exported(tmp_path, killed, "killed-export"), exported(tmp_path, whole, "whole-export")
    assert mine.keys() == want.keys()
    differ = {k: (mine[k] - want[k]).abs().max().item() for k in want if not torch.equal(mine[k], want[k])}
    assert not differ, f"parameters not bit-identical to the uninterrupted run's: {differ}"


def test_a_killed_async_run_resumed_on_another_world_trains_each_group_once(tmp_path):
    k = 1
    small = overlay(tmp_path, {"model": {"zero_stage": 1}, "resources": {"learner": {"world": 2, "num_cpus": 0.5}}})
    one_rank = tmp_path / "one-rank.yaml"
    one_rank.write_text(yaml.safe_dump({"resources": {"learner": {"world": 1, "num_cpus": 1}}}))
    run_dir = tmp_path / "run"
    args = ["--config", "configs/rl-local.yaml", "--config", small, "--mode", "async", "--staleness", str(k)]
    kill_run_after([*args, "--run-dir", str(run_dir)], run_dir / "checkpoints" / "step-00000002")
    r = pliant("rl", *args, "--config", str(one_rank), "--run-dir", str(run_dir), "--resume", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "written by 2 learner rank(s), loaded into 1" in r.stderr
    rows = metrics_rows(run_dir)
    assert [x["step"] for x in rows] == list(range(STEPS))
    trained = sorted(g for x in rows for g in x["groups"])
    assert trained == list(range(STEPS * 4)), trained  # every group once: none lost, none twice
    assert max(x["max_staleness"] for x in rows) <= k
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["learner_world"] == 1 and summary["max_staleness"] <= k


def test_resume_bad_input_is_a_clear_error_and_overwrites_nothing(tmp_path):
    from pliant.config import RLJobConfig, load_config, merge_config, parse_config
    from pliant.rl import runner
    from pliant.rl.resume import run_identity

    base = load_config([ROOT / "configs" / "rl-local.yaml"], RLJobConfig)
    cfg = parse_config(merge_config(base.model_dump(), SMALL), "test", RLJobConfig)
    run_dir = tmp_path / "run"
    with pytest.raises(runner.RLConfigError, match=r"--resume: .*checkpoints holds no complete checkpoint; run "
                                                   r"without --resume"):
        runner.run(cfg, run_dir, resume=True)
    root = run_dir / "checkpoints"
    torn = root / "step-00000004.tmp"
    torn.mkdir(parents=True)
    with pytest.raises(runner.RLConfigError, match=r"holds no complete checkpoint \(step-00000004.tmp: no COMPLETE "
                                                   r"marker, an interrupted write, never loaded\)"):
        runner.run(cfg, run_dir, resume=True)

    def checkpoint(step: int, meta: dict) -> Path:
        path = root / f"step-{step:08d}"
        path.mkdir()
        (path / "meta.json").write_text(json.dumps(meta))
        (path / "COMPLETE").write_text(f"step {step}\n")
        return path

    mine = run_identity(cfg, cfg.rl.seed)
    other = json.loads(json.dumps(mine))
    other["model"]["hidden"] = 64
    other["task"]["max_digits"] = 24
    ckpt = checkpoint(2, {"run": "rl", "version": 2, "world_size": 1, "identity": other, "trained_groups": {}})
    with pytest.raises(runner.RLConfigError, match=r"step-00000002 is of another run: model.hidden=64 there, 128 "
                                                   r"here; task.max_digits=24 there, 12 here"):
        runner.run(cfg, run_dir, resume=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": 2, "model": mine["model"], "world_size": 1}))
    with pytest.raises(runner.RLConfigError, match=r"is a `pliant train` checkpoint, not an RL run's"):
        runner.run(cfg, run_dir, resume=True)
    (ckpt / "meta.json").write_text(json.dumps({"run": "rl", "version": STEPS, "world_size": 1, "identity": mine}))
    with pytest.raises(runner.RLConfigError, match=rf"step-00000002 is at step {STEPS} and rl.steps={STEPS}: nothing "
                                                   r"is left to train"):
        runner.run(cfg, run_dir, resume=True)
    # a new run (no --resume) into a directory with a complete checkpoint: refused, not pruned
    with pytest.raises(runner.RLConfigError, match=r"holds an earlier run's checkpoints \(step-00000002 the newest\)"):
        runner.run(cfg, run_dir)
    assert (ckpt / "COMPLETE").is_file() and torn.is_dir()
    # rl.checkpoint_every beyond the run: a stated default (the last step only), see test_rl_cli
