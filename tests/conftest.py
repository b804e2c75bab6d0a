"""Shared fixtures: configs and small clusters for the planner tests."""
from __future__ import annotations

import os
from pathlib import Path

# DeepSpeed wraps a function it never runs here (its Muon optimizer's Newton-Schulz step) in
# torch.compile at import, which loads dynamo and inductor: about 2 s of CPU per rank, paid by
# every rank of every job the suite launches. pliant compiles nothing, so the session turns
# dynamo off; every job launched from a test inherits it (a fault test runs some 20% faster).
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest

from pliant.config import JobConfig, load_config
from pliant.planner import BandwidthSpec, ClusterSpec, CostSpec, ModelSpec, Planner, PlannerSpec

REPO = Path(__file__).resolve().parent.parent
SHARED_LENGTHS = REPO.parent / "shared" / "data" / "wikipedia_lengths.txt"


@pytest.fixture(scope="session")
def flexsp_cfg() -> JobConfig:
    return load_config(REPO / "configs" / "flexsp-7b-64gpu.yaml")


def small_cluster(nodes: int = 2, per_node: int = 4, memory_gib: float = 1.0) -> ClusterSpec:
    return ClusterSpec(
        name="test", nodes=nodes, devices_per_node=per_node, device="cpu", backend="gloo",
        device_memory_gib=memory_gib,
        bandwidth=BandwidthSpec(intra_node_gbps=4.0, inter_node_gbps=0.25),
    )


def small_model(attention=("softmax",), heads: int = 8, kv_heads: int = 4, layers: int = 4) -> ModelSpec:
    return ModelSpec(
        name="test", layers=layers, hidden=256, heads=heads, kv_heads=kv_heads, head_dim=32, ffn_hidden=512,
        vocab_size=1000, attention=list(attention), zero_stage=1, dtype="bf16",
    )


# Coefficients scaled so a sequence of a few thousand tokens costs about as much as a batch
# of short ones: enough to force groups of mixed sizes on a small cluster.
SMALL_COST = CostSpec(a1_ms=2e-5, a2_ms=0.05, beta_ms=20.0, activation_bytes_per_token=2.0e5)


def small_planner(nodes: int = 2, per_node: int = 4, memory_gib: float = 1.0, time_limit_s: float = 0.3,
                  solver: str = "auto", attention=("softmax",), **spec) -> Planner:
    return Planner.from_specs(small_cluster(nodes, per_node, memory_gib), small_model(attention), SMALL_COST,
                              PlannerSpec(solver=solver, time_limit_s=time_limit_s, **spec))


@pytest.fixture(scope="module")
def pools():
    """Process pools of 1, 2 and 4 gloo ranks for the comm tests (one set per test module)."""
    from dist_pool import DistPool

    made = {w: DistPool(w) for w in (1, 2, 4)}
    yield made
    for p in made.values():
        p.close()


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance of 2 CPUs for a test module (no dashboard), shut down after it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()
