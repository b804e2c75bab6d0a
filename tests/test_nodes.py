"""Which node a process of a multi-node job is (launch/nodes.py): --node-rank or Slurm, and
the bad input it refuses with a message that names the value."""
from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from pliant.launch.config import ConfigError, load_config
from pliant.launch.nodes import expand_nodelist, place_node, wait_reachable

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


def test_an_unreachable_address_fails_within_its_timeout():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.monotonic()
    with pytest.raises(ConfigError, match=f"127.0.0.1:{port} was not reachable within 1 s"):
        wait_reachable("127.0.0.1", port, 1.0, "the rendezvous host")
    assert time.monotonic() - t < 5
