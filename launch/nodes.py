"""Which node of a multi-node job this process runs (docs/faults.md, "Across nodes").

Each node runs `pliant train --config CFG --node-rank I`, the way a scheduler starts one
command per node. Under Slurm the node rank and the hosts come from `SLURM_NODEID` and
`SLURM_JOB_NODELIST` when neither `--node-rank` nor `cluster.hosts` gives them. The first
host is the rendezvous host (torchrun's c10d store) and runs the fault monitor's master.

Everything here is checked before a process starts, with an error that names the value:
a node rank outside the cluster, a Slurm node list that disagrees with `cluster.nodes`, a
host of this rank that is not an address of this machine. (A first host that cannot be
reached is found by the node agent's registration with the master there.)
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass

import psutil

from pliant.config import ConfigError


@dataclass(frozen=True)
class NodePlacement:
    rank: int  # this node's index in cluster.hosts
    hosts: list[str]  # one address per node; hosts[0] is the rendezvous host and runs the master
    source: str  # where the rank came from: --node-rank, SLURM_NODEID, single node

    @property
    def nodes(self) -> int:
        return len(self.hosts)

    @property
    def host(self) -> str:
        return self.hosts[self.rank]

    @property
    def first(self) -> bool:
        return self.rank == 0


def expand_nodelist(text: str) -> list[str]:
    """Slurm's compact host list ('gpu[01-03,07],login5') as host names, in order."""
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", text.strip()):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for item in ranges.split(","):
            lo, _, hi = item.partition("-")
            if not hi:
                hosts.append(f"{prefix}{lo}{suffix}")
                continue
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ConfigError(f"SLURM_JOB_NODELIST: cannot read the range {item!r} in {text!r}")
            hosts += [f"{prefix}{i:0{len(lo)}d}{suffix}" for i in range(int(lo), int(hi) + 1)]
    return hosts


def place_node(cluster, node_rank: int | None, env: dict[str, str] | None = None) -> NodePlacement:
    """This process's node of `cluster`, from --node-rank or Slurm, validated."""
    env = os.environ if env is None else env
    nodes = cluster.nodes
    hosts = list(cluster.hosts) if cluster.hosts else None
    if nodes == 1:  # a one-node job may run inside a larger allocation: Slurm's variables do not apply
        if node_rank not in (None, 0):
            raise ConfigError(f"--node-rank {node_rank}: the cluster config has 1 node (node rank 0)")
        return NodePlacement(0, hosts or ["127.0.0.1"], "single node")
    source = "--node-rank"
    # the job step's nodes (srun) where set, else the allocation's
    var = "SLURM_STEP_NODELIST" if env.get("SLURM_STEP_NODELIST") else "SLURM_JOB_NODELIST"
    slurm_list = env.get(var)
    if slurm_list:
        slurm_hosts = expand_nodelist(slurm_list)
        if len(slurm_hosts) != nodes:
            raise ConfigError(f"{var}={slurm_list!r} names {len(slurm_hosts)} node(s) "
                              f"({', '.join(slurm_hosts)}), but cluster.nodes is {nodes}: allocate {nodes} node(s) "
                              f"or change cluster.nodes")
        hosts = hosts or slurm_hosts
    if node_rank is None and env.get("SLURM_NODEID") is not None:
        node_rank, source = int(env["SLURM_NODEID"]), "SLURM_NODEID"
    if node_rank is None:
        raise ConfigError(f"a {nodes}-node job: give this node's rank with --node-rank I (0..{nodes - 1}), or run "
                          f"it under Slurm (SLURM_NODEID)")
    if not 0 <= node_rank < nodes:
        raise ConfigError(f"node rank {node_rank} ({source}) is outside the cluster: cluster.nodes is {nodes}, "
                          f"so node ranks are 0..{nodes - 1}")
    if not hosts:
        raise ConfigError(f"cluster.hosts: a {nodes}-node job needs one address per node (the first is the "
                          f"rendezvous host), or a Slurm allocation (SLURM_JOB_NODELIST)")
    placement = NodePlacement(node_rank, hosts, source)
    check_host_is_local(placement)
    return placement


def local_addresses() -> dict[str, str]:
    """IPv4 address -> interface name, for every interface of this machine (network namespace)."""
    out = {}
    for iface, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family == socket.AF_INET:
                out[a.address] = iface
    return out


def resolve(host: str) -> str | None:
    try:
        return socket.gethostbyname(host)
    except OSError:
        return None


def check_host_is_local(p: NodePlacement) -> None:
    """Node rank I must run on cluster.hosts[I]: another rank's host, or a second node claiming
    the same rank, is caught here (when the host resolves to an address of some machine)."""
    addr = resolve(p.host)
    mine = local_addresses()
    if addr is None or addr in mine or addr.startswith("127."):
        return
    others = [i for i, h in enumerate(p.hosts) if resolve(h) in mine]
    hint = f"; this machine is cluster.hosts[{others[0]}]: run it with --node-rank {others[0]}" if others else ""
    raise ConfigError(f"node rank {p.rank} ({p.source}) runs on cluster.hosts[{p.rank}] = {p.host} ({addr}), but "
                      f"that is not an address of this machine ({', '.join(sorted(mine))}){hint}")


def interface_of(p: NodePlacement) -> str | None:
    """The network interface this node reaches the other nodes through (gloo and NCCL bind to
    it): the one holding this node's address, or else the one the route to another node's host
    leaves by (a hostname may resolve to 127.0.1.1 on its own machine, never on the others)."""
    mine = local_addresses()
    addr = resolve(p.host)
    if addr in mine and not addr.startswith("127."):
        return mine[addr]
    for i, host in enumerate(p.hosts):
        peer = resolve(host) if i != p.rank else None
        if peer is None or peer.startswith("127."):
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((peer, 9))  # no packet is sent: this only picks the route
                local = s.getsockname()[0]
        except OSError:
            continue
        if local in mine and not local.startswith("127."):
            return mine[local]
    return None
