"""`pliant bench comm` end to end (torchrun, 2 ranks, small lengths)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_comm_small(tmp_path):
    out = tmp_path / "comm.json"
    r = subprocess.run([sys.executable, "-m", "pliant.launch.cli", "bench", "comm", "--world", "2", "--lengths",
                        "256,1024", "--repeats", "1", "--out", str(out)], capture_output=True, text=True,
                       timeout=560, env={**os.environ, "COLUMNS": "120"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads(out.read_text())
    s = data["summary"]
    assert set(s["lasp2_bytes_per_rank"]) == {"256", "1024"} and s["lasp2_bytes_constant"]
    assert s["lasp2_over_ring_time_64k"] is not None and s["ulysses_over_deepspeed_time"] is not None
    assert s["ulysses_vs_deepspeed_max_diff"] <= 1e-6
    methods = {(row["method"], row["length"]) for row in data["rows"]}
    assert {(m, L) for m in ("lasp2", "ring", "ulysses", "lasp2h", "deepspeed") for L in (256, 1024)} <= methods
    for row in data["rows"]:
        if row["bytes_per_rank"] is not None:
            assert row["bytes_per_rank"] == row["analytic_bytes_per_rank"]


def test_bench_comm_rejects_bad_arguments():
    r = subprocess.run([sys.executable, "-m", "pliant.launch.cli", "bench", "comm", "--methods", "lasp3"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown ['lasp3']" in r.stderr
