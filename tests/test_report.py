"""`pliant report`: plots from a run's metrics, clear errors for a missing or broken file."""
from __future__ import annotations

import json
import subprocess
import sys


def test_report_renders_a_png(tmp_path):
    rows = [{"step": i, "loss": 5.0 - i * 0.01, "tokens": 100, "targets": 99, "seconds": 0.5, "predicted_s": 0.4,
             "lr": 1e-3, "group_mix": {"1": 2, "2": 1}, "micro_batches": 1} for i in range(1, 41)]
    rows.append(dict(rows[-1], loss=1.0))  # a resumed run appends a step again: the last record wins
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    r = subprocess.run([sys.executable, "-m", "pliant.launch.cli", "report", str(tmp_path)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    png = tmp_path / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    from pliant.bench.report import load_metrics

    loaded = load_metrics(tmp_path)
    assert len(loaded) == 40 and loaded[-1]["loss"] == 1.0


def test_report_errors(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pliant.launch.cli", "report", str(tmp_path)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "metrics.jsonl does not exist" in r.stderr
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    r = subprocess.run([sys.executable, "-m", "pliant.launch.cli", "report", str(tmp_path)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "line 2: not a JSON object" in r.stderr
