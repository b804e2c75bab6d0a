"""The emulated cluster's network (bench/cluster_net.py): nodes on a rate-limited bridge that carry
what the rate allows, clear errors before anything is made, and nothing left behind after a
normal end, a Ctrl-C or a killed run."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pliant.bench.cluster_net import ClusterNetError, ClusterNetwork, leftovers
from pliant.bench.netns import netns_available

pytestmark = pytest.mark.timeout(120)
PY = sys.executable


@pytest.fixture
def netns():
    reason = netns_available()
    if reason:
        pytest.skip(reason)


def root_links() -> set[str]:
    """The interfaces and qdiscs of the root namespace."""
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    qdiscs = subprocess.run(["tc", "qdisc", "show"], capture_output=True, text=True).stdout
    return {line.split(":")[1].strip() for line in links.splitlines()} | {"qdisc " + q for q in qdiscs.splitlines()}


SERVER = textwrap.dedent("""
    import socket, sys, time
    s = socket.socket()
    s.bind((sys.argv[1], 0)); s.listen(); s.settimeout(30)
    print(s.getsockname()[1], flush=True)
    c, _ = s.accept()
    got, t0 = 0, None
    while got < int(sys.argv[2]):
        b = c.recv(1 << 16)
        if not b:
            break
        t0 = t0 or time.monotonic()
        got += len(b)
    print(got, time.monotonic() - t0, flush=True)
""")
CLIENT = "import socket, sys; c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10); " \
         "c.sendall(b'x' * int(sys.argv[3])); c.close()"


def transfer_s(src, dst, nbytes: int) -> float:
    server = dst.popen([PY, "-c", SERVER, dst.addr, str(nbytes)], stdout=subprocess.PIPE, text=True)
    port = server.stdout.readline().strip()
    assert src.run([PY, "-c", CLIENT, dst.addr, port, str(nbytes)], timeout=60).returncode == 0
    got, seconds = server.stdout.readline().split()
    server.wait(timeout=30)
    assert int(got) == nbytes
    return float(seconds)


def test_nodes_on_the_bridge_carry_what_their_link_allows(netns):
    before = root_links()
    with ClusterNetwork(3, 40) as net:  # 40 Mbit/s = 5 MB/s each way
        n0, n1, n2 = net.nodes
        assert [n.addr.rsplit(".", 1)[1] for n in net.nodes] == ["11", "12", "13"]
        assert root_links() == before, "nothing is added to the root namespace"
        nbytes = 3_000_000
        for src, dst in ((n0, n1), (n2, n0)):
            seconds = transfer_s(src, dst, nbytes)
            rate = nbytes / seconds
            assert 0.6 * 5e6 < rate < 1.25 * 5e6, f"{src.addr} -> {dst.addr}: {rate / 1e6:.2f} MB/s at 40 Mbit/s"
    assert leftovers() == [] and root_links() == before


@pytest.mark.parametrize("nodes, link, message", [
    (2, 0, "must be a finite number above 0"),
    (2, -5, "must be a finite number above 0"),
    (2, "fast", "is not a number"),
    (2, float("nan"), "must be a finite number above 0"),
    (1, 100, "at least 2 nodes"),
    (200, 100, "at most 89"),
])
def test_bad_input_is_named_before_any_namespace_is_made(nodes, link, message):
    before = leftovers()
    with pytest.raises(ClusterNetError, match=message):
        ClusterNetwork(nodes, link).open()
    assert leftovers() == before


OPEN = "from pliant.bench.cluster_net import ClusterNetwork; ClusterNetwork(2, 100).open()"
# pliant is imported as root, then the process becomes nobody: a checkout nobody may read does not matter
OPEN_AS_NOBODY = ("import os; from pliant.bench.cluster_net import ClusterNetwork; os.setgroups([]); "
                  "os.setgid(65534); os.setuid(65534); ClusterNetwork(2, 100).open()")


def test_missing_tc_and_not_root_are_named_before_any_namespace_is_made(tmp_path, netns):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(shutil.which("ip"), bin_dir / "ip")  # ip, but no tc
    r = subprocess.run([PY, "-c", OPEN], capture_output=True, text=True, env={**os.environ, "PATH": str(bin_dir)},
                       timeout=60)
    assert r.returncode != 0 and "`tc` is not on PATH" in r.stderr.splitlines()[-1], r.stderr[-500:]
    r = subprocess.run([PY, "-c", OPEN_AS_NOBODY], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "needs root" in r.stderr.splitlines()[-1], r.stderr[-500:]
    assert leftovers() == []


HOLD = textwrap.dedent("""
    import subprocess, sys, time
    from pliant.bench.cluster_net import ClusterNetwork
    with ClusterNetwork(2, 100) as net:
        net.nodes[0].popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print("up", flush=True)
        time.sleep(600)
""")


@pytest.mark.parametrize("how", ["end", "ctrl-c", "sigkill"])
def test_nothing_is_left_behind(netns, how):
    before = root_links()
    if how == "end":
        with ClusterNetwork(2, 100) as net:
            net.nodes[1].popen([PY, "-c", "import time; time.sleep(600)"])
    else:
        holder = subprocess.Popen([PY, "-c", HOLD], stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "up"
        assert len(leftovers()) == 3  # two nodes and the switch
        holder.send_signal(signal.SIGINT if how == "ctrl-c" else signal.SIGKILL)
        holder.wait(timeout=30)
    deadline = time.monotonic() + 15  # after SIGKILL, the reaper cleans up as soon as the pipe closes
    while leftovers() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftovers() == [] and root_links() == before
    sleepers = subprocess.run(["pgrep", "-f", "import time; time.sleep(600)"], capture_output=True, text=True).stdout
    assert sleepers.split() == [], "a node's process outlived its cluster"
