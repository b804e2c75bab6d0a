"""Which node a process of a multi-node job is (launch/nodes.py): --node-rank or Slurm, and
the bad input it refuses with a message that names the value."""
from __future__ import annotations

from pathlib import Path

import pytest

from pliant.config import ConfigError, load_config
from pliant.launch.nodes import NodePlacement, expand_nodelist, interface_of, place_node

REPO = Path(__file__).resolve().parents[1]


def cluster(tmp_path: Path, nodes: int = 2, hosts: list[str] | None = None):
    text = (REPO / "configs" / "faults-cpu.yaml").read_text().replace("nodes: 1", f"nodes: {nodes}")
    text = text.replace("devices_per_node: 4", "devices_per_node: 2")
    if hosts is not None:
        text = text.replace("  device: cpu", f"  device: cpu\n  hosts: [{', '.join(hosts)}]")
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return load_config([str(path)]).cluster


def test_slurm_nodelist_expands_like_scontrol():
    assert expand_nodelist("gpu[01-03,07],login5") == ["gpu01", "gpu02", "gpu03", "gpu07", "login5"]
    assert expand_nodelist("n[8-10]-ib") == ["n8-ib", "n9-ib", "n10-ib"]
    assert expand_nodelist("a,b") == ["a", "b"]
    with pytest.raises(ConfigError, match="cannot read the range"):
        expand_nodelist("n[5-2]")


def test_node_rank_from_the_command_line_or_slurm(tmp_path):
    c = cluster(tmp_path, hosts=["127.0.0.1", "127.0.0.2"])
    assert place_node(c, 1, env={}).rank == 1
    p = place_node(c, None, env={"SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "127.0.0.[1-2]"})
    assert (p.rank, p.source, p.hosts) == (1, "SLURM_NODEID", ["127.0.0.1", "127.0.0.2"])
    nohosts = cluster(tmp_path)
    p = place_node(nohosts, None, env={"SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "localhost,127.0.0.1"})
    assert p.hosts == ["localhost", "127.0.0.1"] and p.first


def test_node_rank_outside_the_cluster(tmp_path):
    c = cluster(tmp_path, hosts=["127.0.0.1", "127.0.0.2"])
    with pytest.raises(ConfigError, match=r"node rank 2 \(--node-rank\) is outside the cluster: cluster.nodes is 2, "
                                          r"so node ranks are 0..1"):
        place_node(c, 2, env={})
    with pytest.raises(ConfigError, match="give this node's rank with --node-rank"):
        place_node(c, None, env={})


def test_slurm_nodelist_that_disagrees_with_the_cluster(tmp_path):
    c = cluster(tmp_path, nodes=2)
    with pytest.raises(ConfigError, match=r"SLURM_JOB_NODELIST='n\[1-3\]' names 3 node\(s\) \(n1, n2, n3\), but "
                                          r"cluster.nodes is 2"):
        place_node(c, None, env={"SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "n[1-3]"})


def test_a_host_that_is_not_this_machine(tmp_path):
    """Two nodes claiming the same rank: the one not at that rank's address is refused."""
    c = cluster(tmp_path, hosts=["127.0.0.1", "192.0.2.7"])  # 192.0.2.0/24: documentation, never local
    with pytest.raises(ConfigError, match=r"node rank 1 \(--node-rank\) runs on cluster.hosts\[1\] = 192.0.2.7 .*not "
                                          r"an address of this machine"):
        place_node(c, 1, env={})


def test_a_one_node_job_inside_a_larger_allocation_ignores_slurm(tmp_path):
    c = cluster(tmp_path, nodes=1)
    p = place_node(c, None, env={"SLURM_NODEID": "3", "SLURM_JOB_NODELIST": "n[1-8]"})
    assert p.rank == 0 and p.nodes == 1


def test_the_step_node_list_wins_over_the_allocation(tmp_path):
    c = cluster(tmp_path, nodes=2)
    p = place_node(c, None, env={"SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "n[1-8]",
                                 "SLURM_STEP_NODELIST": "localhost,127.0.0.1"})
    assert p.hosts == ["localhost", "127.0.0.1"]


def test_the_interface_towards_the_other_nodes():
    """This machine's own address names its interface; a host that resolves to loopback does
    not, and then the route towards another node's host picks it."""
    from pliant.launch.nodes import local_addresses

    outward = {a: i for a, i in local_addresses().items() if not a.startswith("127.")}
    if not outward:
        pytest.skip("no interface but loopback")
    addr, iface = next(iter(outward.items()))
    assert interface_of(NodePlacement(0, [addr, "192.0.2.7"], "test")) == iface
    assert interface_of(NodePlacement(0, ["127.0.1.1", "127.0.0.2"], "test")) is None


@pytest.mark.parametrize("spare,bad,world,slots,nodes", [
    (1, {4}, 4, [0, 1, 3, 5], [0, 1]),  # a spare on node 1 takes the bad slot's place
    (0, {0}, 2, [1, 2], [0, 1]),  # no spare: one rank per node, node 0 kept
    (0, {2, 3}, 2, [0, 1], [0]),  # node 1 gone: node 0 alone
    (0, {3}, 2, [0, 1], [0]),  # the largest even world; ties keep fewer nodes, never without node 0
])
def test_every_node_composes_the_same_restart(tmp_path, spare, bad, world, slots, nodes):
    from pliant.launch.supervisor import Supervisor

    text = (REPO / "configs" / "faults-cpu.yaml").read_text().replace("nodes: 1", "nodes: 2").replace(
        "devices_per_node: 4", "devices_per_node: 2").replace("spare_devices_per_node: 2",
                                                              f"spare_devices_per_node: {spare}").replace(
        "device_memory_gib: 0.0012", "device_memory_gib: 0.005\n  hosts: [127.0.0.1, 127.0.0.2]")
    path = tmp_path / "job.yaml"
    path.write_text(text)
    cfg = load_config([str(path)])
    starts = []
    for rank in (0, 1):
        sup = Supervisor(cfg, [str(path)], "m", [], tmp_path / f"run{rank}",
                         node=NodePlacement(rank, ["127.0.0.1", "127.0.0.2"], "test"))
        start = sup._next_start(1, {s: "bad" for s in bad})
        starts.append((start.world, start.slots, start.nodes, start.cfg.cluster.nodes, start.cfg.cluster.hosts))
    assert starts[0] == starts[1]
    assert starts[0][:3] == (world, slots, nodes)
    assert starts[0][3] == len(nodes) and starts[0][4] == [["127.0.0.1", "127.0.0.2"][n] for n in nodes]


def test_a_restart_without_node_0_is_refused(tmp_path):
    from pliant.launch.supervisor import RestartError, Supervisor

    text = (REPO / "configs" / "faults-cpu.yaml").read_text().replace("nodes: 1", "nodes: 2").replace(
        "devices_per_node: 4", "devices_per_node: 2").replace("spare_devices_per_node: 2", "spare_devices_per_node: 0")
    path = tmp_path / "job.yaml"
    path.write_text(text.replace("  device: cpu", "  device: cpu\n  hosts: [127.0.0.1, 127.0.0.2]"))
    sup = Supervisor(load_config([str(path)]), [str(path)], "m", [], tmp_path / "run",
                     node=NodePlacement(1, ["127.0.0.1", "127.0.0.2"], "test"))
    with pytest.raises(RestartError, match=r"node 0 \(127.0.0.1\), the rendezvous host .* has no healthy slot left"):
        sup._next_start(1, {0: "crash", 1: "crash"})
