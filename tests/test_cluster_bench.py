"""`pliant bench cluster` (launch/cluster_bench.py): what a machine cannot host is named before
any namespace exists, and a whole run (profile and every plan mode on a 2-node emulated cluster)
writes the issue's summary and leaves no namespace behind."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO
from pliant.bench.cluster_net import ClusterNetError, leftovers
from pliant.bench.netns import netns_available
from pliant.config import load_config
from pliant.launch.cluster_bench import check_capacity, derive

CONFIG = REPO / "configs" / "emulated-cluster.yaml"


def test_a_machine_too_small_for_the_cluster_is_named():
    cfg = load_config([str(CONFIG)])
    assert check_capacity(cfg, cores=2, memory_gib=8.0)["ranks"] == 4
    with pytest.raises(ClusterNetError, match=r"2 nodes x 3 ranks = 6 ranks on 1 cores: this machine hosts at most 4"):
        check_capacity(cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"devices_per_node": 3})}),
                       cores=1, memory_gib=8.0)
    with pytest.raises(ClusterNetError, match=r"4 ranks need about 4 GiB .* 2.0 GiB available"):
        check_capacity(cfg, cores=2, memory_gib=2.0)
    with pytest.raises(ClusterNetError, match=r"cluster.cores = 1 per node: the config prices 2 cores for its 2 "
                                              r"nodes, and their ranks share this machine's 1"):
        check_capacity(cfg, cores=1, memory_gib=8.0)


def test_the_link_rate_is_derived_from_the_reference_cluster():
    d = derive(load_config([str(CONFIG)]))
    assert d.reference_group == 16 and d.group == 4 and d.ranks_per_node == 2 and d.length == 2048
    assert 0.1 < d.ratio < 0.25 and 100 < d.link_mbit < 10000
    assert "B = D r^2 / ((s - 1) rho compute(L, s))" in d.formula


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pliant.launch.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.mark.parametrize("rate,message", [("0", "must be a finite number above 0"), ("fast", "is not a number")])
def test_a_bad_link_rate_is_named(rate, message):
    r = _cli("bench", "cluster", "--link-mbit", rate, "--out", "/nonexistent/x.json")
    assert r.returncode == 2 and message in r.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_whole_run_writes_the_summary_and_leaves_nothing(tmp_path):
    reason = netns_available()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "cluster.json"
    r = _cli("bench", "cluster", "--sweep", "", "--rounds", "1", "--steps-per-round", "2", "--warmup", "1",
             "--out", str(out), "--timeout", "400")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    body = json.loads(out.read_text())
    s = body["summary"]
    for key in ("link_mbit", "measured_speedup_vs_best_static", "predicted_speedup_vs_best_static",
                "measured_speedup_vs_batchada", "prediction_error_median"):
        assert isinstance(s[key], float) and s[key] > 0, key
    assert s["link_derived"] and s["link_mbit"] == pytest.approx(body["derivation"]["link_mbit"])
    point = body["points"][0]
    assert set(point["modes"]) == {"adaptive", "static-4", "batchada"}  # the longest needs 4 ranks: no dp, no static-2
    assert point["profile"]["cluster"]["bandwidth"]["all_to_all_gbps"].keys() == {"2", "4"}
    assert out.with_suffix(".png").stat().st_size > 0
    assert leftovers() == []
