"""An emulated cluster's network on one machine: N nodes, each a network namespace with its own
address, joined through a bridge by veth pairs whose egress is rate-limited with tc's token
bucket filter (tbf), on both ends of each pair, so that each node's link carries at most
`link_mbit` each way, as a NIC does. (`netem` is not built into these kernels; tbf is.)

    from pliant.bench.cluster_net import ClusterNetwork

    with ClusterNetwork(nodes=2, link_mbit=200) as net:
        p = net.nodes[0].popen([...])    # runs as `ip netns exec <name> ...`, gloo bound to its link

Topology, for namespaces named `<prefix>-<pid>-<k>...`:

    node 0  plnet0 10.231.R.11 --veth-- p0 \\
    node 1  plnet0 10.231.R.12 --veth-- p1 -- br0 (in the switch namespace `...sw`)
    ...                                    /

Every interface, bridge and qdisc lives inside the namespaces: nothing is added to the root
namespace, and deleting the namespaces removes all of it. Node addresses have the same length
(.11 to .99), so that the node that sorts first by address, which hosts torchrun's c10d store, is
node 0 (bench/netns.py explains why this matters).

Nothing is left behind: a normal end or an exception (Ctrl-C included) deletes the namespaces;
for an end that runs no Python (SIGKILL, a crash), a reaper process started first, in a session
of its own, holds the read end of a pipe on which this process writes each namespace's name
before it creates it, and deletes them all when the pipe closes, which it does when this
process ends, however it ends.

Every check that does not need the network runs before the first namespace is made
(`check_host`): the link rate, the node count, Linux, root, `ip` and `tc`.
"""
from __future__ import annotations

import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from .netns import IFACE, SUBNET_FIRST_OCTETS, Node, _ip, _ip_binary, cleanup_stale, list_namespaces

PREFIX = "plcl"  # namespaces of emulated clusters (bench/netns.py's pairs use "pliant")
FIRST_HOST = 11  # node i is .(11 + i): addresses of equal length
MAX_NODES = 99 - FIRST_HOST + 1
BRIDGE = "br0"
MIN_BURST_BYTES = 16 * 1024
TBF_LATENCY_MS = 200  # how long a packet may wait for tokens before tbf drops it (its queue)
_serial = iter(range(1 << 30))


class ClusterNetError(ValueError):
    """An emulated cluster that cannot be built here, named before anything is made."""


@dataclass(frozen=True)
class LinkSpec:
    """A node's link: `mbit` megabits per second each way (10^6 bits)."""

    mbit: float

    @property
    def bytes_per_s(self) -> float:
        return self.mbit * 1e6 / 8

    def tbf_args(self) -> list[str]:
        """tc's tbf at this rate: a bucket of 1 ms of traffic (at least 16 KiB: tbf cannot reach its
        rate with a bucket smaller than what one timer tick sends), a queue of TBF_LATENCY_MS."""
        burst = max(MIN_BURST_BYTES, int(self.bytes_per_s * 1e-3))
        return ["tbf", "rate", f"{self.mbit:g}mbit", "burst", str(burst), "latency", f"{TBF_LATENCY_MS}ms"]


def parse_link_mbit(value) -> float:
    """The link rate in Mbit/s from a number or a string; ClusterNetError if it is not a finite
    positive number."""
    try:
        mbit = float(value)
    except (TypeError, ValueError):
        raise ClusterNetError(f"link rate {value!r} is not a number (Mbit/s, e.g. 200)") from None
    if not math.isfinite(mbit) or mbit <= 0:
        raise ClusterNetError(f"link rate {value!r} Mbit/s: it must be a finite number above 0")
    return mbit


def check_host(nodes: int, link_mbit) -> LinkSpec:
    """Everything that can be checked before a namespace is made; the link, or ClusterNetError
    naming what is wrong."""
    link = LinkSpec(parse_link_mbit(link_mbit))
    if not isinstance(nodes, int) or isinstance(nodes, bool) or nodes < 2:
        raise ClusterNetError(f"an emulated cluster needs at least 2 nodes, not {nodes!r}")
    if nodes > MAX_NODES:
        raise ClusterNetError(f"{nodes} nodes: an emulated cluster holds at most {MAX_NODES} (node addresses "
                              f".{FIRST_HOST} to .99 of one /24)")
    if not sys.platform.startswith("linux"):
        raise ClusterNetError(f"an emulated cluster needs Linux network namespaces (this is {sys.platform})")
    if os.geteuid() != 0:
        raise ClusterNetError("an emulated cluster needs root (it creates network namespaces and sets tc qdiscs); "
                              f"this process runs as uid {os.geteuid()}")
    for tool, found in (("ip", _ip_binary()), ("tc", shutil.which("tc"))):
        if found is None:
            raise ClusterNetError(f"`{tool}` is not on PATH (iproute2); an emulated cluster needs it")
    return link


def _tc(*args: str) -> None:
    r = subprocess.run(["tc", *args], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"`tc {' '.join(args)}` failed ({r.returncode}): {r.stderr.strip()}")


class ClusterNetwork:
    """`nodes` namespaces on a rate-limited bridge; `with ClusterNetwork(...) as net` or open()/close()."""

    def __init__(self, nodes: int, link_mbit, prefix: str = PREFIX):
        self.nodes_wanted, self.link_mbit, self.prefix = nodes, link_mbit, prefix
        self.nodes: list[Node] = []
        self.link: LinkSpec | None = None
        self._made: list[str] = []
        self._reaper: subprocess.Popen | None = None
        self._tell = None  # the write end of the reaper's pipe

    # ----- build -----
    def open(self) -> "ClusterNetwork":
        self.link = check_host(self.nodes_wanted, self.link_mbit)
        cleanup_stale(self.prefix)
        self._start_reaper()
        k = next(_serial)
        base = f"{self.prefix}-{os.getpid()}-{k}"
        subnet = f"{SUBNET_FIRST_OCTETS}.{random.randrange(256)}"
        switch = f"{base}sw"
        try:
            self._namespace(switch)
            _ip("-n", switch, "link", "add", BRIDGE, "type", "bridge")
            _ip("-n", switch, "link", "set", BRIDGE, "up")
            for i in range(self.nodes_wanted):
                name, port, addr = f"{base}n{i}", f"p{i}", f"{subnet}.{FIRST_HOST + i}"
                self._namespace(name)
                _ip("link", "add", IFACE, "netns", name, "type", "veth", "peer", "name", port, "netns", switch)
                _ip("-n", switch, "link", "set", port, "master", BRIDGE)
                _ip("-n", switch, "link", "set", port, "up")
                _ip("-n", name, "addr", "add", f"{addr}/24", "dev", IFACE)
                _ip("-n", name, "link", "set", "lo", "up")
                _ip("-n", name, "link", "set", IFACE, "up")
                _tc("-n", name, "qdisc", "add", "dev", IFACE, "root", *self.link.tbf_args())  # its upload
                _tc("-n", switch, "qdisc", "add", "dev", port, "root", *self.link.tbf_args())  # its download
                self.nodes.append(Node(name, addr))
        except BaseException:
            self.close()
            raise
        return self

    def _start_reaper(self) -> None:
        r, w = os.pipe()
        self._reaper = subprocess.Popen([sys.executable, "-m", "pliant.bench.cluster_net", "reap"], stdin=r,
                                        start_new_session=True, stdout=subprocess.DEVNULL)
        os.close(r)
        self._tell = os.fdopen(w, "w", buffering=1)

    def _namespace(self, name: str) -> None:
        self._tell.write(name + "\n")  # the reaper knows it before it exists
        self._made.append(name)
        _ip("netns", "add", name)

    # ----- tear down -----
    def close(self) -> None:
        """Kill what the nodes started and delete the namespaces (their links and qdiscs with
        them); safe to call more than once."""
        for node in self.nodes:
            node.kill_all()
        while self._made:
            _ip("netns", "del", self._made.pop(), check=False)
        if self._tell is not None:
            self._tell.close()  # the reaper finds nothing left and exits
            self._tell = None
        if self._reaper is not None:
            try:
                self._reaper.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._reaper.kill()
            self._reaper = None

    def __enter__(self) -> "ClusterNetwork":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> dict:
        return {"nodes": len(self.nodes), "link_mbit": self.link.mbit if self.link else None,
                "addresses": [n.addr for n in self.nodes], "namespaces": [n.name for n in self.nodes],
                "tbf": " ".join(self.link.tbf_args()) if self.link else None}


def leftovers(prefix: str = PREFIX) -> list[str]:
    """Namespaces of emulated clusters that exist now."""
    return [n for n in list_namespaces() if n.startswith(f"{prefix}-")]


def _reap() -> int:
    """The reaper: read namespace names from stdin until it closes (its parent ended, however),
    then kill what still runs in each of them and delete it."""
    names = [line.strip() for line in sys.stdin if line.strip()]
    if names:  # an `ip netns add` of the killed process may still be finishing: wait it out, then sweep
        time.sleep(0.5)
        base = names[0][:-2]  # <prefix>-<pid>-<k>: every name of the network starts with it
        names += [n for n in list_namespaces() if n.startswith(base) and n not in names]
    for name in reversed(names):
        pids = _ip("netns", "pids", name, check=False).stdout
        for pid in pids.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        _ip("netns", "del", name, check=False)
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["reap"]:
        raise SystemExit(_reap())
    raise SystemExit("usage: python -m pliant.bench.cluster_net reap  (the emulated cluster's own reaper)")
