"""`pliant bench comm` end to end (torchrun, 2 ranks, small lengths)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

GDN = ("gdn_gather", "gdn_ring", "gdn_heads")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_comm_small(tmp_path):
    out = tmp_path / "comm.json"
    r = subprocess.run([sys.executable, "-m", "pliant.launch.cli", "bench", "comm", "--world", "2", "--lengths",
                        "256,1024", "--repeats", "1", "--short", "100", "--out", str(out)], capture_output=True,
                       text=True, timeout=560, env={**os.environ, "COLUMNS": "120"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads(out.read_text())
    s = data["summary"]
    assert set(s["lasp2_bytes_per_rank"]) == {"256", "1024"} and s["lasp2_bytes_constant"]
    assert s["lasp2_over_ring_time_64k"] is not None and s["ulysses_over_deepspeed_time"] is not None
    assert s["ulysses_vs_deepspeed_max_diff"] <= 1e-6
    cases = {(row["method"], row["length"], row["case"]) for row in data["rows"]}
    assert {(m, L, "one") for m in ("lasp2", "ring", "ulysses", "lasp2h", "deepspeed") + GDN for L in (256, 1024)} \
        <= cases
    # the many-short pack: 1024 tokens as 10 sequences of 100 and one of 24; DeepSpeed's local attention has no
    # document mask, so it runs one sequence only
    assert {(m, 1024, "many") for m in ("lasp2", "ring", "ulysses", "lasp2h") + GDN} <= cases
    assert not any(row["method"] == "deepspeed" and row["case"] == "many" for row in data["rows"])
    for row in data["rows"]:
        assert row["aten_ops"] > 0 and len(row["aten_ops_by_rank"]) == 2
        if row["case"] == "many":
            assert row["sequences"] == (11 if row["length"] == 1024 else 3)  # 2 x 100 + 56
        if row["bytes_per_rank"] is not None:  # the per-sequence states of the many-short pack included
            assert row["bytes_per_rank"] == row["analytic_bytes_per_rank"]
    many = s["one_vs_many"]
    assert set(many) == {"lasp2", "ring", "ulysses", "lasp2h", *GDN} and set(many["lasp2"]) == {"256", "1024"}
    assert many["lasp2"]["1024"]["sequences"] == 11 and many["lasp2"]["1024"]["ops_many"] > 0
    # the gated delta rule's gather form: per sequence, heads x dk x (dk + dv) float32 values to the one peer
    # forward, heads x dk x dv backward, whatever the length; the head all-to-all grows with it
    forward, backward = 4 * 32 * 64 * 4, 4 * 32 * 32 * 4
    assert s["gdn_gather_analytic_bytes_per_sequence"]["total"] == forward + backward
    assert s["gdn_gather_bytes_per_rank"] == {"256": forward + backward, "1024": forward + backward}
    assert s["gdn_gather_bytes_constant"] and s["gdn_gather_bytes_equal_analytic"]
    assert s["gdn_heads_bytes_per_rank"]["1024"] == 4 * s["gdn_heads_bytes_per_rank"]["256"] > forward + backward
    assert set(s["gdn_gather_over_heads_time"]) == set(s["gdn_gather_over_ring_time"]) == {"256", "1024"}
    ops = s["gdn_ops"]
    assert (ops["length"], ops["sequences_many"]) == (1024, 11)
    assert 0 < ops["local_ops_one"] < ops["ops_one"] and 0 < ops["local_ops_many"] < ops["ops_many"]
    assert ops["ops_within_bound"] == (max(ops["ops_one"], ops["ops_many"]) <= 2000)
    assert ops["ratio_within_bound"] == (ops["ops_many"] / ops["ops_one"] <= 1.5)


def test_bench_comm_rejects_bad_arguments():
    r = subprocess.run([sys.executable, "-m", "pliant.launch.cli", "bench", "comm", "--methods", "lasp3"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown ['lasp3']" in r.stderr
