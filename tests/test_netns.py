"""The two-namespace harness (bench/netns.py): reachability, isolation, a real 2-node torchrun job, cleanup."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from pliant.bench.netns import NodeNetwork, _ip_binary, list_namespaces, netns_available, torchrun_argv, two_node_network

PY = sys.executable
IP = _ip_binary() or "ip"


@pytest.fixture(autouse=True)
def _need_netns():
    reason = netns_available()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def nodes():
    with two_node_network() as ns:
        yield ns


SERVER = textwrap.dedent("""
    import socket, sys
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], 0))
    s.listen()
    s.settimeout(30)
    print(s.getsockname()[1], flush=True)
    c, peer = s.accept()
    c.sendall(("pong from " + sys.argv[1] + " to " + peer[0]).encode())
    c.close()
""")

CLIENT = textwrap.dedent("""
    import socket, sys
    try:
        c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    except OSError as e:
        print("FAILED", type(e).__name__, e)
        sys.exit(3)
    print(c.recv(100).decode())
""")


@pytest.mark.timeout(120)
def test_nodes_reach_each_other(nodes):
    n0, n1 = nodes
    assert n0.addr != n1.addr and n0.name != n1.name
    for src, dst in ((n0, n1), (n1, n0)):
        server = dst.popen([PY, "-c", SERVER, dst.addr], stdout=subprocess.PIPE, text=True)
        port = int(server.stdout.readline())
        res = src.run([PY, "-c", CLIENT, dst.addr, str(port)], timeout=30)
        assert res.returncode == 0, res.stdout + res.stderr
        assert res.stdout.strip() == f"pong from {dst.addr} to {src.addr}"
        assert server.wait(timeout=30) == 0
    # Only lo and the veth end live in a node; the root namespace's interfaces are not there.
    links = n0.run([IP, "-o", "link", "show"], timeout=30, check=True).stdout
    names = sorted(line.split(":")[1].strip().split("@")[0] for line in links.splitlines())
    assert names == sorted(["lo", n0.iface])


@pytest.mark.timeout(120)
def test_root_loopback_not_reachable_from_a_node(nodes):
    n0, _ = nodes
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        # Sanity: reachable from the root namespace ...
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        # ... but not from inside node 0, whose 127.0.0.1 is its own loopback.
        res = n0.run([PY, "-c", CLIENT, "127.0.0.1", str(port)], timeout=30)
    assert res.returncode == 3, res.stdout + res.stderr
    assert "ConnectionRefusedError" in res.stdout


WORKER = textwrap.dedent("""
    import datetime, os, sys
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    assert world == 4 and t.item() == 10.0, (world, t)
    with open(os.path.join(sys.argv[1], f"rank{rank}"), "w") as f:
        f.write(f"{os.environ['NODE_NAME']} {os.environ['GROUP_RANK']} {os.environ['MASTER_ADDR']} {t.item()}")
    dist.destroy_process_group()
""")


@pytest.mark.timeout(120)
def test_torchrun_two_nodes_c10d(nodes, tmp_path: Path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "out"
    out.mkdir()
    run_id = uuid.uuid4().hex[:12]
    procs, logs = [], []
    t0 = time.monotonic()
    for node in nodes:
        argv = torchrun_argv(node, nodes[0], nodes, [script, out], nproc_per_node=2, run_id=run_id,
                             join_timeout=60, read_timeout=30, python=PY)
        log = tmp_path / f"{node.name}.log"
        logs.append(log)
        with open(log, "w") as fh:
            procs.append(node.popen(argv, env={"OMP_NUM_THREADS": "1", "NODE_NAME": node.name},
                                    stdout=fh, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=max(1.0, 100 - (time.monotonic() - t0))) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    report = "\n".join(f"--- {log.name}\n{log.read_text()[-4000:]}" for log in logs)
    assert codes == [0, 0], report
    files = {p.name: p.read_text().split() for p in out.iterdir()}
    assert sorted(files) == ["rank0", "rank1", "rank2", "rank3"], report
    n0, n1 = nodes
    for rank, (node_name, group_rank, master_addr, total) in files.items():
        # Node 0 (the address that sorts first) is rendezvous rank 0 and hosts the workers' store.
        expect = n0 if rank in ("rank0", "rank1") else n1
        assert (node_name, group_rank) == (expect.name, str(nodes.index(expect))), files
        assert master_addr == n0.addr, files
        assert float(total) == 10.0


@pytest.mark.timeout(120)
def test_cleanup_leaves_no_namespace():
    before = set(list_namespaces())
    with two_node_network() as (n0, n1):
        names = {n0.name, n1.name}
        assert names <= set(list_namespaces())
        sleeper = n0.popen(["sleep", "1000"])
    assert not names & set(list_namespaces())
    assert sleeper.poll() == -signal.SIGKILL  # processes left running in a node are killed

    with pytest.raises(RuntimeError, match="boom"):
        with two_node_network() as (n0, n1):
            names = {n0.name, n1.name}
            raise RuntimeError("boom")
    assert not names & set(list_namespaces())

    net = NodeNetwork()
    net.open()
    names = {n.name for n in net.nodes}
    net.close()
    net.close()  # idempotent
    assert not names & set(list_namespaces())
    # (other test runs may create their own pliant-<pid>-* namespaces meanwhile; only ours must be gone)
    assert not {n for n in list_namespaces() if n.startswith(f"pliant-{os.getpid()}-")} - before


@pytest.mark.timeout(120)
def test_stale_namespaces_of_dead_pids_are_removed():
    prefix = "pliant-staletest"
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert not _alive(dead.pid)
    stale, live = f"{prefix}-{dead.pid}-0a", f"{prefix}-{os.getpid()}-99a"
    for name in (stale, live):
        subprocess.run([IP, "netns", "add", name], check=True)
    try:
        with two_node_network(prefix) as (n0, _):
            assert n0.name.startswith(f"{prefix}-{os.getpid()}-")
            present = set(list_namespaces())
            assert stale not in present  # its creator is dead
            assert live in present  # a live process's namespace is left alone
    finally:
        for name in (stale, live):
            subprocess.run([IP, "netns", "del", name], capture_output=True)
    assert not any(n.startswith(f"{prefix}-{os.getpid()}-") or n == stale for n in list_namespaces())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
