"""The emulated cluster's link rate (bench/cluster_rate.py): at the derived rate, the emulated
cross-node group's communication over its compute equals the reference's, computed here by hand."""
from __future__ import annotations

from pathlib import Path

import pytest

from pliant.bench.cluster_rate import derive_link_mbit
from pliant.config import load_config
from pliant.planner.cost import CostModel

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def cost_model(name: str, **model):
    cfg = load_config(CONFIGS / name)
    return CostModel.from_specs(cfg.cluster, cfg.model.model_copy(update=model), cfg.cost, cfg.planner)


def test_the_derived_rate_matches_the_references_ratio_by_hand():
    ref = cost_model("flexsp-7b-64gpu.yaml")
    emu = cost_model("local-cpu.yaml", attention=["softmax"])
    d = derive_link_mbit(ref, 8, 191872, emu, ranks_per_node=2, factor=64)
    # the reference by hand: 32 layers, 32 heads of 128, bf16, Ulysses in a group of 16 at 10.3 GB/s
    L, s = 191872, 16
    sent = 2 * 32 * (L / s) * (s - 1) / s * (2 * 32 + 2 * 32) * 128 * 2  # forward and backward, q k v o
    comm = sent / 10.3e9 * 1e3
    compute = (5.128e-6 * L * L + 0.184 * L) / s
    assert d.reference_comm_ms == pytest.approx(comm, rel=1e-9)
    assert d.reference_compute_ms == pytest.approx(compute, rel=1e-9)
    # the emulated side by hand: 4 layers, 4 heads (2 kv, replicated to 4) of 16, fp32, a group of 4
    L, s, r = 3000, 4, 2  # 191872 // 64 = 2998, padded to a multiple of the group
    sent = 2 * 4 * (L / s) * (s - 1) / s * (2 * 4 + 2 * 4) * 16 * 4
    assert d.bytes_per_device == pytest.approx(sent, rel=1e-9)
    rate = d.link_mbit * 1e6 / 8  # bytes/s
    link_ms = sent * r / (s - 1) * r / rate * 1e3  # each device's cross-node share, r of them on one link
    assert link_ms / d.compute_ms == pytest.approx(comm / compute, rel=1e-9)
    assert f"= {d.link_mbit:.4g} Mbit/s" in d.formula


def test_a_model_without_softmax_layers_has_no_rate_to_derive():
    ref = cost_model("flexsp-7b-64gpu.yaml")
    emu = cost_model("local-cpu.yaml", attention=["linear"])
    with pytest.raises(ValueError, match="sends nothing"):
        derive_link_mbit(ref, 8, 191872, emu, ranks_per_node=2, factor=64)
