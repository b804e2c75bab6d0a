"""The job config schema: bundled configs load; bad input is rejected naming key and value."""
from __future__ import annotations

import copy

import pytest
import yaml

from pliant.config import ConfigError, _Loader, load_config, parse_config

from conftest import REPO


@pytest.fixture()
def raw() -> dict:
    return yaml.load((REPO / "configs" / "flexsp-7b-64gpu.yaml").read_text(), Loader=_Loader)


def test_bundled_configs_load():
    big = load_config(REPO / "configs" / "flexsp-7b-64gpu.yaml")
    assert big.cluster.world_size == 64 and big.cluster.device_memory_gib == 80
    assert big.model.params == 6.74e9 and big.model.zero_stage == 3
    assert big.cost.a1_ms == 5.128e-6 and big.cost.beta_ms == 629.0
    assert big.cluster.bandwidth.all_to_all_gbps[16] == 10.3
    local = load_config("local-cpu")  # bundled name works from anywhere
    assert local.cluster.world_size == 4 and local.cluster.backend == "gloo"
    assert local.model.n_linear == 3 and local.model.n_softmax == 1


def test_scientific_notation_is_a_number():
    cfg = load_config(REPO / "configs" / "flexsp-7b-64gpu.yaml")
    assert isinstance(cfg.model.params, float) and isinstance(cfg.cost.activation_bytes_per_token, float)


def _error(raw: dict, mutate) -> str:
    d = copy.deepcopy(raw)
    mutate(d)
    with pytest.raises(ConfigError) as e:
        parse_config(d, "job.yaml")
    return str(e.value)


@pytest.mark.parametrize("mutate, expect", [
    (lambda d: d["cluster"].update(node=8), ["cluster.node", "unknown key"]),
    (lambda d: d.update(extra={}), ["extra", "unknown key"]),
    (lambda d: d["cluster"].update(nodes="8"), ["cluster.nodes", "'8'", "integer"]),
    (lambda d: d["cluster"].update(nodes=0), ["cluster.nodes", "0", "greater than 0"]),
    (lambda d: d["cluster"].update(devices_per_node=-8), ["cluster.devices_per_node", "-8"]),
    (lambda d: d["cluster"].update(device_memory_gib=-80), ["cluster.device_memory_gib", "-80"]),
    (lambda d: d["cluster"].pop("device_memory_gib"), ["cluster.device_memory_gib", "missing"]),
    (lambda d: d["cluster"].update(device="tpu"), ["cluster.device", "'tpu'"]),
    (lambda d: d["cluster"].update(device="cpu"), ["cluster", "nccl", "cpu"]),
    (lambda d: d["cluster"].update(nodes=16), ["all_to_all_gbps", "128"]),
    (lambda d: d["cluster"]["bandwidth"].update(intra_node_gbps=100), ["bandwidth", "not both"]),
    (lambda d: d["cluster"]["bandwidth"]["all_to_all_gbps"].update({1: 10}), ["group sizes must be >= 2"]),
    (lambda d: d["cluster"]["bandwidth"]["all_to_all_gbps"].update({128: 1}), ["[128]", "exceed"]),
    (lambda d: d["model"].update(heads=30), ["model", "heads=30", "kv_heads=32"]),
    (lambda d: d["model"].update(attention=["linear", "linear", "softmax"]), ["model", "pattern of 3", "layers=32"]),
    (lambda d: d["model"].update(attention=["mamba"]), ["model.attention.0", "'mamba'"]),
    (lambda d: d["model"].update(zero_stage=4), ["model.zero_stage", "4"]),
    (lambda d: d["cost"].update(a2_ms=-0.1), ["cost.a2_ms", "-0.1"]),
    (lambda d: d["cost"].pop("beta_ms"), ["cost.beta_ms", "missing"]),
    (lambda d: d["planner"].update(solver="gurobi"), ["planner.solver", "'gurobi'"]),
    (lambda d: d["planner"].update(time_limit_s=0), ["planner.time_limit_s", "0"]),
])
def test_bad_values_name_the_key(raw, mutate, expect):
    msg = _error(raw, mutate)
    assert msg.startswith("job.yaml")
    for part in expect:
        assert part in msg, f"{part!r} not in {msg!r}"


def test_every_problem_is_reported(raw):
    msg = _error(raw, lambda d: (d["cluster"].update(nodes=-1), d["cost"].update(a2_ms=0)))
    assert "cluster.nodes" in msg and "cost.a2_ms" in msg and "2 problem(s)" in msg


def test_not_a_mapping_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_config([1, 2], "list.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")


def test_intra_inter_bandwidth_form(raw):
    d = copy.deepcopy(raw)
    d["cluster"]["bandwidth"] = {"intra_node_gbps": 100.0, "inter_node_gbps": 10.0}
    cfg = parse_config(d)
    assert cfg.cluster.bandwidth.all_to_all_gbps is None
    msg = _error(raw, lambda d: d["cluster"].update(bandwidth={"intra_node_gbps": 100.0}))
    assert "inter_node_gbps" in msg


def test_overlay_replaces_tables_and_merges_sections():
    from pliant.config import merge_config

    base = {"cluster": {"nodes": 1, "bandwidth": {"all_to_all_gbps": {2: 1.0, 4: 2.5}, "all_gather_gbps": {2: 0.4}}}}
    overlay = {"cluster": {"bandwidth": {"all_to_all_gbps": {2: 1.0, 3: 2.5}}}}
    merged = merge_config(base, overlay)
    assert merged["cluster"]["nodes"] == 1
    assert merged["cluster"]["bandwidth"]["all_to_all_gbps"] == {2: 1.0, 3: 2.5}  # replaced, not {2, 3, 4}
    assert merged["cluster"]["bandwidth"]["all_gather_gbps"] == {2: 0.4}
