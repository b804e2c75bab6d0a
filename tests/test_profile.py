"""`pliant profile` and `pliant bench train`: the fits recover known coefficients, the
shared-core pricing, config overlays, and both commands end to end on 4 ranks."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pliant.bench.train_bench import paired, summarize
from pliant.config import ConfigError, load_config
from pliant.planner import Planner
from pliant.planner.calibrate import nnls_fit
from pliant.planner.cost import CostModel
from pliant.planner.validate import validate_plan
from pliant.runtime.profiler import CollectiveTiming, PackTiming, SavedBytes, fit_compute, fit_links, tiling

from conftest import REPO

LOCAL = REPO / "configs" / "local-cpu.yaml"


def test_nnls_fit_matches_the_constrained_optimum():
    rng = np.random.default_rng(0)
    A = rng.uniform(0.1, 1.0, (30, 3))
    x_true = np.array([2.0, 0.0, 0.5])
    x, res = nnls_fit(A, A @ x_true)
    np.testing.assert_allclose(x, x_true, atol=1e-10)
    assert res < 1e-9
    # the unconstrained answer has a negative entry: the constrained one clips it to the boundary
    y = A @ np.array([1.0, -1.0, 1.0])
    x, _ = nnls_fit(A, y)
    assert (x >= 0).all() and x[1] == 0.0
    with pytest.raises(ValueError, match="required"):
        nnls_fit(np.array([[1.0, -1.0]]), np.array([-1.0]), required=[0])


def _cost():
    cfg = load_config(LOCAL)
    return cfg, CostModel.from_specs(cfg.cluster, cfg.model, cfg.cost, cfg.planner)


def test_fit_compute_recovers_the_coefficients_that_made_the_timings():
    cfg, cost = _cost()
    a1, a2, gamma, beta = 3e-5, 0.15, 7.0, 20.0
    cases = [(1, [64]), (1, [512]), (1, [2048]), (1, [4096]), (1, [64] * 16), (2, [4096]), (4, [128] * 8),
             (4, [4096])]
    packs = []
    for s, lengths in cases:
        L = cost.padded(np.array(lengths), s)
        comm = cost.group_comm_ms(np.array(lengths), s)
        ms = beta + float(((a1 * L * L + a2 * L) / s + gamma).sum()) + comm
        packs.append(PackTiming(s, lengths, ms))
    fit = fit_compute(packs, cost)
    assert fit.a1_eff_ms == pytest.approx(a1, rel=1e-6) and fit.a2_ms == pytest.approx(a2, rel=1e-6)
    assert fit.gamma_ms == pytest.approx(gamma, rel=1e-6) and fit.beta_ms == pytest.approx(beta, rel=1e-6)
    assert fit.max_rel_error < 1e-9 and all(p.fitted_ms == pytest.approx(p.ms) for p in packs)


def test_fit_links_recovers_bandwidth_and_latency():
    rows = [CollectiveTiming("all_to_all", 4, b, 0.5 + b / 2e9 * 1e3) for b in (1 << 16, 1 << 20, 1 << 22)]
    (link,) = fit_links(rows)
    assert link.gbps == pytest.approx(2.0, rel=1e-9) and link.latency_ms == pytest.approx(0.5, rel=1e-9)


def test_tiling_follows_the_node_rule():
    assert tiling(8, 4, 2) == [(0, 2), (2, 2), (4, 2), (6, 2)]
    assert tiling(8, 4, 3) == [(0, 3), (4, 3)]  # a group of 3 never spans two nodes
    assert tiling(8, 4, 8) == [(0, 8)]


def test_saved_bytes_counts_what_autograd_keeps():
    a = torch.randn(100, dtype=torch.float64, requires_grad=True)
    b = torch.randn(100, dtype=torch.float64, requires_grad=True)
    with SavedBytes() as saved:
        (a * b).sum()
    assert saved.bytes == 2 * 100 * 8  # mul keeps both operands


def test_shared_core_pricing():
    _, shared = _cost()
    assert shared.cores == 2 and shared.world_size == 4
    # balanced: every rank busy all along, as the timings were measured
    assert shared.micro_batch_ms([(1, 100.0)] * 4) == pytest.approx(100.0)
    # one group of one busy, three idle: it gets a whole core (twice its share)
    assert shared.micro_batch_ms([(1, 100.0)]) == pytest.approx(50.0)
    # a group of 4 alone is still oversubscribed
    assert shared.micro_batch_ms([(4, 100.0)]) == pytest.approx(100.0)
    # imbalanced: the total rank-time bounds it
    assert shared.micro_batch_ms([(1, 100.0), (1, 20.0), (1, 20.0), (1, 20.0)]) == pytest.approx(50.0)
    dedicated = dataclasses.replace(shared, cores=None)
    assert dedicated.micro_batch_ms([(1, 100.0), (1, 20.0)]) == 100.0


def test_plans_on_shared_cores_validate_and_use_the_shared_price():
    cfg, _ = _cost()
    planner = Planner.from_specs(cfg.cluster, cfg.model, cfg.cost, cfg.planner)
    lengths = np.array([4000, 300, 200, 900, 1200, 64, 80])
    for plan in (planner.plan(lengths), planner.plan_fixed(lengths, 1), planner.plan_fixed(lengths, 2)):
        validate_plan(plan, planner.cost, planner.sizes)
        for mb in plan.micro_batches:
            busy = [(g.size, g.predicted_ms) for g in mb.groups if g.seq_ids]
            assert mb.predicted_ms == pytest.approx(planner.cost.micro_batch_ms(busy))
            assert mb.predicted_ms <= max(ms for _, ms in busy) + 1e-9


def test_config_overlays_merge_key_by_key(tmp_path):
    over = tmp_path / "coeffs.yaml"
    over.write_text("cost:\n  beta_ms: 1.5\ncluster:\n  bandwidth:\n    all_to_all_gbps: {2: 9.0, 4: 9.0}\n")
    cfg = load_config([LOCAL, over])
    base = load_config(LOCAL)
    assert cfg.cost.beta_ms == 1.5 and cfg.cost.a2_ms == base.cost.a2_ms
    assert cfg.cluster.bandwidth.all_to_all_gbps == {2: 9.0, 4: 9.0}
    assert cfg.cluster.bandwidth.all_gather_gbps == base.cluster.bandwidth.all_gather_gbps
    bad = tmp_path / "bad.yaml"
    bad.write_text("cost:\n  beta_ms: -1.0\n")
    with pytest.raises(ConfigError, match=r"(?s)bad.yaml.*cost.beta_ms = -1.0"):
        load_config([LOCAL, bad])


def test_summarize_picks_the_best_static_degree():
    recs = []
    for mode, secs in (("adaptive", 1.0), ("static-2", 1.5), ("static-4", 1.2), ("dp", 2.0)):
        for step in range(1, 5):
            recs.append({"mode": mode, "round": 0, "step": step, "seconds": secs, "predicted_s": secs * 1.1,
                         "loss": 1.0})
    s = summarize(recs, warmup=1)["summary"]
    assert s["static_degree"] == 4 and s["static_step_s"] == 1.2
    assert s["speedup_vs_static"] == pytest.approx(1.2) and s["speedup_vs_dp"] == pytest.approx(2.0)
    assert s["prediction_error_median"] == pytest.approx(0.1)
    assert s["speedup_vs_batchada"] is None and s["predicted_speedup_vs_static"] == pytest.approx(1.2)


def test_summarize_without_dp_and_with_batchada():
    """Where the longest sequence needs SP there is no dp mode; BatchAda is compared when run."""
    recs = [{"mode": mode, "round": 0, "step": step, "seconds": secs, "predicted_s": pred, "loss": 1.0}
            for mode, secs, pred in (("adaptive", 1.0, 0.9), ("static-4", 1.5, 1.6), ("batchada", 1.25, 1.2))
            for step in range(1, 4)]
    s = summarize(recs, warmup=1)["summary"]
    assert s["dp_step_s"] is None and s["speedup_vs_dp"] is None
    assert s["speedup_vs_batchada"] == pytest.approx(1.25) and s["predicted_speedup_vs_batchada"] == pytest.approx(1.2 / 0.9)
    assert s["predicted_speedup_vs_static"] == pytest.approx(1.6 / 0.9)


def test_paired_ratios_pair_the_same_batches_and_name_where_plans_differ():
    """Step k of every mode trains the same batch: the ratios pair them; the batches whose plans
    differ are counted and summarised apart from those where they agree (noise only)."""
    recs = []
    for step in range(1, 12):
        long_doc = step % 4 == 0  # batches with a long document: adaptive mixes sizes, BatchAda cannot
        for mode, secs in (("adaptive", 1.0), ("batchada", 2.0 if long_doc else 1.0 + 0.01 * (step % 3 - 1))):
            mix = {1: 6, 4: 1} if long_doc and mode == "adaptive" else ({4: 2} if long_doc else {1: 8})
            recs.append({"mode": mode, "round": 0, "step": step, "seconds": secs, "group_mix": mix,
                         "micro_batches": 2})
    p = paired(recs, warmup=1, base="batchada")
    assert p["batches"] == 10 and p["plans_differ"] == 2
    assert p["median_ratio_where_plans_differ"] == pytest.approx(2.0)
    assert p["median_ratio_where_plans_agree"] == pytest.approx(1.0)
    assert p["throughput_ratio"] == pytest.approx(sum(r["seconds"] for r in recs if r["mode"] == "batchada"
                                                      and r["step"] > 1) / 10)
    lo, hi = p["median_ratio_ci95"]
    assert lo <= p["median_ratio"] <= hi
    with pytest.raises(ValueError, match="no batch ran under both"):
        paired(recs, warmup=1, base="static-4")


def _pliant(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PLIANT_PG_TIMEOUT_S": "60"}
    return subprocess.run([sys.executable, "-m", "pliant.launch.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


@pytest.mark.slow
@pytest.mark.timeout(280)
def test_profile_end_to_end_writes_a_usable_overlay(tmp_path):
    out = tmp_path / "coeffs.yaml"
    r = _pliant("profile", "--config", str(LOCAL), "--out", str(out), "--quick", "--calibration-steps", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = load_config([LOCAL, out])  # the overlay validates on top of its base
    assert cfg.cost.a2_ms > 0 and cfg.cost.activation_bytes_per_token > 1000
    assert set(cfg.cluster.bandwidth.all_to_all_gbps) == {2, 4}
    report = json.loads(out.with_suffix(".json").read_text())
    assert len(report["steps"]) == 3 and report["packs"] and report["links"]
    assert all(p["ms"] > 0 for p in report["packs"])


@pytest.mark.slow
@pytest.mark.timeout(280)
def test_bench_train_end_to_end(tmp_path):
    out = tmp_path / "train.json"
    r = _pliant("bench", "train", "--config", str(LOCAL), "--out", str(out), "--rounds", "1", "--steps-per-round",
                "3", "--warmup", "1", "--batchada")
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    s = doc["summary"]
    for key in ("adaptive_step_s", "static_step_s", "dp_step_s", "batchada_step_s", "speedup_vs_static",
                "speedup_vs_batchada", "prediction_error_median"):
        assert s[key] > 0, key
    assert set(doc["modes"]) == {"adaptive", "static-2", "static-4", "batchada", "dp"}
    # rank 0's wait for each step's plan from the background planner is recorded
    assert all(0 <= r["plan_wait_s"] < r["seconds"] for r in doc["records"])
    # every mode trained the same batches from the same initial weights: same losses (any plan, same gradients)
    losses = [m["final_loss"] for m in doc["modes"].values()]
    assert max(losses) - min(losses) < 1e-4
