"""Checkpoints: a run killed after step k and resumed ends with exactly the parameters of an
uninterrupted run; incomplete checkpoints are never loaded; a different model is refused."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pliant.launch.torchrun import local_command
import torch

from conftest import REPO

CONFIG = REPO / "tests" / "configs" / "equiv-4cpu.yaml"


def config(tmp_path, **changes):
    text = CONFIG.read_text().replace("  steps: 5\n", "  steps: 6\n  checkpoint_every: 2\n  keep_checkpoints: 2\n")
    for old, new in changes.items():
        text = text.replace(old, new)
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def steps_saved(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())


def worker(cfg, run_dir, *extra, fail_at=None, timeout=600):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PLIANT_PG_TIMEOUT_S": "60"}
    if fail_at:
        env["PLIANT_FAIL_AT_STEP"] = str(fail_at)
    cmd = local_command(4, "pliant.launch.worker", ["--config", str(cfg), "--run-dir", str(run_dir), "--save-params",
                                                    *extra])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_killed_and_resumed_run_equals_uninterrupted(tmp_path):
    cfg = config(tmp_path)
    a = worker(cfg, tmp_path / "a")
    assert a.returncode == 0, a.stderr[-3000:]
    b = worker(cfg, tmp_path / "b", fail_at=5)
    assert b.returncode != 0  # rank 0 died after step 5; its last checkpoint is step 4
    assert steps_saved(tmp_path / "b") == ["step-00000002", "step-00000004"]
    resumed = worker(cfg, tmp_path / "b", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 4" in resumed.stdout
    pa = torch.load(tmp_path / "a" / "final_params.pt")
    pb = torch.load(tmp_path / "b" / "final_params.pt")
    assert torch.equal(pa, pb), f"max difference {(pa - pb).abs().max().item():.3e}"
    # the per-step losses of the resumed steps equal the uninterrupted run's, bit for bit
    la = {json.loads(x)["step"]: json.loads(x)["loss"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()}
    lb = {json.loads(x)["step"]: json.loads(x)["loss"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()}
    assert lb[5] == la[5] and lb[6] == la[6]
    # keep_checkpoints: 2 -> only the newest two remain
    assert steps_saved(tmp_path / "a") == ["step-00000004", "step-00000006"]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_incomplete_checkpoints_are_ignored_and_other_models_refused(tmp_path):
    cfg = config(tmp_path)
    run = tmp_path / "run"
    first = worker(cfg, run, fail_at=3)
    assert first.returncode != 0
    done = run / "checkpoints" / "step-00000002"
    assert (done / "COMPLETE").is_file()
    # a write that was cut off: a .tmp directory, and a directory whose marker never landed
    (run / "checkpoints" / "step-00000004.tmp").mkdir()
    broken = run / "checkpoints" / "step-00000003"
    broken.mkdir()
    (broken / "meta.json").write_text("{")
    resumed = worker(cfg, run, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 2" in resumed.stdout
    assert not (run / "checkpoints" / "step-00000004.tmp").exists()  # cleaned up by the next save
    other = config(tmp_path, **{"  ffn_hidden: 64": "  ffn_hidden: 60"})
    refused = worker(other, run, "--resume")
    assert refused.returncode != 0
    assert "is of a different model: ffn_hidden=64 there, 60 here" in refused.stderr
