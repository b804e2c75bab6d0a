"""The `pliant` command line: plan and bench planner, end to end in subprocesses."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SHARED_LENGTHS

CONFIG = str(REPO / "configs" / "flexsp-7b-64gpu.yaml")


def pliant(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "pliant.launch.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def test_console_script_is_installed():
    exe = shutil.which("pliant", path=str(Path(sys.executable).parent))
    assert exe is not None
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "plan" in out.stdout and "bench" in out.stdout


def test_plan_prints_table_and_writes_json(tmp_path):
    out = tmp_path / "plan.json"
    r = pliant("plan", "--config", CONFIG, "--dist", "wikipedia", "--batch-tokens", "524288", "--max-len", "196608",
               "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "adaptive plan" in r.stdout and "softmax SP" in r.stdout and "static SP=16" in r.stdout
    plan = json.loads(out.read_text())
    assert plan["world_size"] == 64 and plan["strategy"] == "adaptive"
    assert sum(len(g["seq_ids"]) for mb in plan["micro_batches"] for g in mb["groups"]) == len(plan["lengths"])
    assert plan["micro_batches"][0]["stats"]["source"] in ("milp", "heuristic")


def test_plan_errors_are_clear(tmp_path):
    bad = tmp_path / "lengths.txt"
    bad.write_text("100\nten\n")
    r = pliant("plan", "--config", CONFIG, "--lengths", str(bad), "--batch-tokens", "1000", "--out",
               str(tmp_path / "p.json"))
    assert r.returncode == 2 and "line 2: 'ten' is not an integer" in r.stderr and "Traceback" not in r.stderr
    long = tmp_path / "long.txt"
    long.write_text("2000000\n")
    r = pliant("plan", "--config", CONFIG, "--lengths", str(long), "--batch-tokens", "4000000", "--out",
               str(tmp_path / "p.json"))
    assert r.returncode == 2 and "2000000 tokens" in r.stderr and "longest sequence this cluster can hold" in r.stderr
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(Path(CONFIG).read_text().replace("nodes: 8", "nodes: -8"))
    r = pliant("plan", "--config", str(cfg), "--dist", "wikipedia", "--batch-tokens", "1000")
    assert r.returncode == 2 and "cluster.nodes = -8" in r.stderr
    r = pliant("plan", "--config", CONFIG, "--dist", "nope", "--batch-tokens", "1000")
    assert r.returncode == 2 and "unknown length distribution 'nope'" in r.stderr
    r = pliant("plan", "--config", CONFIG, "--dist", "wikipedia", "--batch-tokens", "1000", "--time-limit", "-1")
    assert r.returncode == 2 and "planner.time_limit_s = -1.0" in r.stderr


REQUIRED = ["adaptive_s", "static_s", "fixed_s", "batchada_s", "lower_bound_s", "solve_s"]
SUMMARY = ["speedup_vs_static_median", "speedup_vs_batchada_median", "speedup_vs_batchada_min",
           "gap_to_lower_bound_median", "solve_s_p95"]


def test_bench_planner_small(tmp_path):
    out = tmp_path / "bench.json"
    r = pliant("bench", "planner", "--config", CONFIG, "--dist", "wikipedia-synth", "--batch-tokens", "262144",
               "--max-len", "131072", "--batches", "2", "--solver", "cbc", "--time-limit", "1.0", "--out", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["solver"] == "cbc" and data["time_limit_s"] == 1.0
    assert len(data["per_batch"]) == 2
    for row in data["per_batch"]:
        for key in REQUIRED:
            assert key in row
        assert row["fixed_s"]["64"] is not None and "1" in row["fixed_s"]
        assert row["adaptive_s"] <= row["batchada_s"] * (1 + 1e-9)
        assert row["adaptive_s"] >= row["lower_bound_s"]
    for key in SUMMARY:
        assert data["summary"][key] is not None
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "planner benchmark" in r.stdout


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_LENGTHS.is_file(), reason="../shared/data is not beside this checkout")
def test_bench_planner_wikipedia_targets(tmp_path):
    """The issue's setting: 64 GPUs, 512K-token batches of real Wikipedia lengths, truncated at 192K.
    Checks the cost-model outcomes (speedups, bound gap), not timings."""
    out = tmp_path / "bench.json"
    r = pliant("bench", "planner", "--config", CONFIG, "--lengths", str(SHARED_LENGTHS), "--batch-tokens", "524288",
               "--max-len", "196608", "--batches", "8", "--out", str(out), timeout=600)
    assert r.returncode == 0, r.stderr
    s = json.loads(out.read_text())["summary"]
    assert s["static_degree"] == 16
    assert s["speedup_vs_static_median"] >= 1.5
    assert s["speedup_vs_batchada_min"] >= 1.0
    assert s["speedup_vs_batchada_median"] >= 1.03
    assert s["gap_to_lower_bound_median"] <= 0.10
