"""`pliant bench faults` end to end on one class and one torchft fault: it writes the JSON
with the summary the issue asks for, localises the crash, raises no alarm under jitter, and
measures torchft's crashed replica beside it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pliant.bench.fault_runs import DETECT_S, environment

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_bench_faults_writes_summary_and_torchft_side_by_side(tmp_path: Path) -> None:
    out = tmp_path / "faults.json"
    cmd = [sys.executable, "-m", "pliant.launch.cli", "bench", "faults", "--classes", "crash", "--repeats", "1",
           "--overhead-steps", "6", "--overhead-repeats", "1", "--jitter-steps", "6", "--torchft-faults", "crash", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=560, env=environment([]))
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    body = json.loads(out.read_text())
    s = body["summary"]
    assert {"classes", "all_localised", "max_detection_s_hang_crash", "overhead_ratio", "false_alarms"} <= set(s)
    assert s["classes"] == 1 and s["all_localised"] is True
    assert 0 < s["max_detection_s_hang_crash"] < DETECT_S
    assert s["false_alarms"] == 0 and body["false_alarm_run"]["steps_done"] == 6
    assert s["overhead_ratio"] > 0
    crash = body["classes"][0]
    assert crash["runs"][0]["incident"]["ranks"] == [2] and crash["steps_lost"] is not None
    row = body["vs_torchft"][0]
    assert row["fault"] == "crash" and row["torchft_noticed_s"] is not None and row["torchft_noticed_s"] > 0
    # torchft finds a dead replica by its missing heartbeat and leaves it out of the next quorum
    assert row["torchft_dropped_from_quorum_s"] is not None
    assert "side by side with torchft" in r.stdout
