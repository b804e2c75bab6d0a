"""A real 2-node job on this machine (issue 17): two `pliant train --node-rank I` commands,
each in its own network namespace with its own address (bench/netns.py: a veth pair),
2 ranks and a spare slot per node, torchrun's c10d rendezvous on node 0, gloo bound by
pliant to the node's interface, the fault monitor's master on node 0 and a node agent in
each node's supervisor. A fault on a rank of node 1 is named with its node, both nodes
restart, and training reaches the last step with the parameters of a fault-free 2-node run.
A whole-node loss is reported as the node, and the job goes on with the nodes left."""
from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest
import torch

from pliant.bench.fault_runs import DETECT_S, Job, command, environment, run_two_node_job, two_node_overlay
from pliant.bench.netns import netns_available, two_node_network

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "faults-cpu.yaml"
LAST_STEP = 8
_ports = itertools.count(29400, 10)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def nodes():
    reason = netns_available()
    if reason:
        pytest.skip(reason)
    with two_node_network() as pair:
        yield pair


def run(tmp_path, nodes, name, faults=(), overlay=None, **kw) -> Job:
    return run_two_node_job(tmp_path, name, CONFIG, nodes, list(faults), overlay, port=next(_ports), **kw)


@pytest.fixture(scope="module")
def clean(tmp_path_factory, nodes) -> Job:
    job = run(tmp_path_factory.mktemp("clean2"), nodes, "run")
    assert job.rc == 0, job.tail()
    assert job.incidents == [], "a clean 2-node run raised alarms"
    assert job.steps[-1] == LAST_STEP
    return job


def assert_both_nodes_restarted(job: Job, clean: Job, bad_slots: set[int]) -> None:
    assert job.rc == 0, job.tail()
    for name in ("supervisor.json", "supervisor-node1.json"):  # node 0's and node 1's supervisors
        sup = Job(0, "", job.run_dir)._json(f"monitor/{name}")[0]
        assert [a["outcome"] for a in sup["attempts"]] == ["incident", "finished"], (name, sup)
        assert set(map(int, sup["bad_slots"])) == bad_slots, (name, sup)
    assert job.steps[-1] == LAST_STEP
    assert torch.equal(job.params, clean.params), \
        f"max difference {(job.params - clean.params).abs().max().item():.3e}"


# slots: node 0 holds 0, 1 (spare 2), node 1 holds 3, 4 (spare 5); ranks 0, 1 on node 0, 2, 3 on node 1
@pytest.mark.parametrize("fault,kind,rank,slot", [
    ({"kind": "crash", "rank": 3, "step": 5}, "crash", 3, 4),
    ({"kind": "hang_before_collective", "rank": 2, "step": 5}, "noncomm_hang", 2, 3),
    ({"kind": "nan", "rank": 3, "step": 5}, "nan", 3, None),
])
def test_a_fault_on_node_1_is_named_with_its_node_and_both_nodes_restart(tmp_path, nodes, clean, fault, kind, rank,
                                                                          slot):
    job = run(tmp_path, nodes, kind, [fault])
    inc = job.only_incident(kind)
    assert inc["ranks"] == [rank] and inc["nodes"] == [1], inc
    assert job.latency(inc) < DETECT_S
    assert inc["restart"]["world"] == 4 and inc["restart"]["nodes"] == [0, 1]
    assert_both_nodes_restarted(job, clean, {slot} if slot is not None else set())


def test_a_lost_node_is_reported_as_the_node(tmp_path, nodes):
    """Every process of node 1 killed at step 4: the node is named, not its ranks, and the
    job goes on with node 0 alone (a world of 2; more device memory so that it holds the
    longest sequence)."""
    job = run(tmp_path, nodes, "lost", overlay={"cluster": {"device_memory_gib": 0.005}}, kill_node_at_step=4)
    inc = job.only_incident("node_lost")
    assert inc["exclude_nodes"] == [1] and inc["ranks"] == [2, 3] and inc["nodes"] == [1, 1]
    assert inc["evidence"]["host"] == nodes[1].addr
    assert inc["detection_s"] < DETECT_S
    assert inc["restart"]["world"] == 2 and inc["restart"]["nodes"] == [0]
    assert job.rc == 0, job.tail()
    assert job.steps[-1] == LAST_STEP
    sup = job.supervisor
    assert set(map(int, sup["bad_slots"])) == {3, 4, 5} and sup["attempts"][1]["world"] == 2


def test_bad_placements_fail_fast_with_a_clear_message(tmp_path, nodes):
    def node_cmd(i: int, name: str, overlay: dict | None = None) -> list[str]:
        return command(tmp_path / name, CONFIG, two_node_overlay(nodes, next(_ports), overlay)) + ["--node-rank", str(i)]

    env = environment([])
    # node rank 0 claimed from node 1's namespace: not this machine's address
    r = nodes[1].run(node_cmd(0, "dup"), env=env, timeout=60)
    assert r.returncode == 2 and "runs on cluster.hosts[0]" in r.stderr and "not an address of this machine" in \
        r.stderr and "run it with --node-rank 1" in r.stderr, r.stderr
    r = nodes[0].run(node_cmd(2, "range"), env=env, timeout=60)
    assert r.returncode == 2 and "node rank 2 (--node-rank) is outside the cluster" in r.stderr, r.stderr
    # node 1 alone: node 0 (the master and the rendezvous) never comes
    t = time.monotonic()
    r = nodes[1].run(node_cmd(1, "alone", {"cluster": {"rendezvous_timeout_s": 5}}), env=env, timeout=60)
    assert r.returncode != 0 and "did not answer within 5 s" in r.stderr, r.stderr[-2000:]
    assert time.monotonic() - t < 30
