"""Errors are not faults (docs/faults.md): bad input ends `pliant train` at once with its own
message as the last line and a non-zero status: no restart, no slot marked bad, no rank blamed.

* found by the driver before anything starts: a bad override, missing or corrupt token files,
  token ids beyond the model's vocabulary, a model directory whose weights disagree with its
  config.json;
* raised on the ranks of a running job (injected): one of pliant's input errors on one rank,
  or the same exception on every rank. A different exception on one rank is still a crash
  (tests/faults/test_classify.py), and a crashed rank is restarted (tests/faults/test_faults.py).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from pliant.bench.fault_runs import run_job
from pliant.runtime.indexed import write_indexed

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "configs" / "local-cpu.yaml"
FAULTS = REPO / "configs" / "faults-cpu.yaml"
END_S = 15.0  # each bad input ends the job within this


def pliant_train(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "pliant.launch.cli", "train", "--run-dir", str(tmp_path / "run"),
                        *args], capture_output=True, text=True, timeout=120)
    return r, time.monotonic() - t0


def assert_refused(tmp_path: Path, r: subprocess.CompletedProcess, seconds: float, *words: str) -> None:
    """Non-zero, within END_S, the problem on the last line (of "pliant: error: ..."), no
    traceback, and no start, so nothing restarted and no slot marked bad."""
    out = (r.stdout + r.stderr).strip()
    assert r.returncode != 0 and seconds < END_S, (r.returncode, seconds)
    assert "pliant: error:" in out and "Traceback" not in out, out[-2000:]
    assert all(w in out.splitlines()[-1] for w in words), out[-2000:]
    assert not (tmp_path / "run" / "monitor").exists()  # no start, so nothing restarted or marked bad


def overlay(tmp_path: Path, doc: dict) -> str:
    path = tmp_path / "overlay.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def tokens(tmp_path: Path, high: int) -> Path:
    rng = np.random.default_rng(0)
    return write_indexed(tmp_path / "data" / "tok", [rng.integers(0, high, size=n) for n in (40, 80, 120)], None)


def test_a_bad_override_is_refused_before_any_start(tmp_path):
    r, s = pliant_train(tmp_path, "--config", str(LOCAL), "--steps", "-3")
    assert_refused(tmp_path, r, s, "train.steps = -3")


def test_missing_token_files_are_refused(tmp_path):
    data = overlay(tmp_path, {"data": {"source": "tokens", "token_prefix": str(tmp_path / "missing" / "prefix"),
                                       "dist": None}})
    r, s = pliant_train(tmp_path, "--config", str(LOCAL), "--config", data)
    assert_refused(tmp_path, r, s, "missing/prefix.idx does not exist")


def test_a_corrupt_index_is_refused(tmp_path):
    prefix = tokens(tmp_path, 200)
    idx = prefix.with_suffix(".idx")
    raw = bytearray(idx.read_bytes())
    raw[:9] = b"NOTMMIDX\x00"  # not Megatron's magic
    idx.write_bytes(bytes(raw))
    data = overlay(tmp_path, {"data": {"source": "tokens", "token_prefix": str(prefix), "dist": None}})
    r, s = pliant_train(tmp_path, "--config", str(LOCAL), "--config", data)
    assert_refused(tmp_path, r, s, str(idx))


def test_token_ids_beyond_the_vocabulary_are_refused(tmp_path):
    prefix = tokens(tmp_path, 300)  # local-cpu's model has 256 ids
    data = overlay(tmp_path, {"data": {"source": "tokens", "token_prefix": str(prefix), "dist": None}})
    r, s = pliant_train(tmp_path, "--config", str(LOCAL), "--config", data)
    assert_refused(tmp_path, r, s, "tok.bin", "outside the model's vocabulary [0, 256)")


def test_weights_that_disagree_with_config_json_are_refused(tmp_path):
    from hf_jobs import hf_job_config
    from pliant.runtime.scaffold import write_tiny_model

    model_dir = write_tiny_model("llama", tmp_path / "llama", 64, seed=1)
    config = json.loads((model_dir / "config.json").read_text())
    config["intermediate_size"] += 8
    (model_dir / "config.json").write_text(json.dumps(config))
    job = hf_job_config(tmp_path / "job.yaml", model_dir)
    r, s = pliant_train(tmp_path, "--config", str(job))
    assert_refused(tmp_path, r, s, "model.safetensors", "config.json gives")


def assert_stopped(job, raised_by: list[int], message: str) -> None:
    """Ended by the master's stop decision: one start, no slot marked bad, the rank's message last."""
    assert job.rc == 2, job.tail()
    sup = job.supervisor
    assert [a["outcome"] for a in sup["attempts"]] == ["stopped"] and sup["bad_slots"] == {}, sup
    (inc,) = job.incidents
    assert (inc["kind"], inc["ranks"], inc["action"], inc["exclude"]) == ("error", [], "stop", [])
    assert inc["evidence"]["raised_by"] == raised_by and message in inc["evidence"]["message"]
    assert job.out.strip().splitlines()[-1] == f"pliant: error: {inc['evidence']['message']}"
    fired = min(f["wall"] for f in job.fired)
    assert inc["detected_wall"] - fired < END_S


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_an_input_error_on_one_rank_stops_the_job_without_a_restart(tmp_path):
    job = run_job(tmp_path, "input", FAULTS, [{"kind": "raise_input_error", "rank": 1, "step": 3}])
    assert_stopped(job, [1], "InputError: injected input error at step 3")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_same_exception_on_every_rank_stops_the_job_without_a_restart(tmp_path):
    job = run_job(tmp_path, "same", FAULTS, [{"kind": "raise", "rank": r, "step": 3} for r in range(4)])
    assert_stopped(job, [0, 1, 2, 3], "RuntimeError: injected error at step 3")
