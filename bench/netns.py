"""Two "nodes" on one machine: each in its own Linux network namespace, with its own IP address.

Usage (root, iproute2's ``ip`` installed)::

    from pliant.bench.netns import netns_available, two_node_network

    reason = netns_available()
    if reason:
        pytest.skip(reason)
    with two_node_network() as (n0, n1):
        p0 = n0.popen([...])            # runs as ``ip netns exec <n0.name> ...``
        n1.run([...], timeout=60)       # blocking variant

Topology: two namespaces ``<prefix>-<pid>-<k>`` joined by ONE veth pair created directly inside them
(``ip link add IFACE netns A type veth peer name IFACE netns B``), addresses ``10.231.<r>.1/24`` and
``10.231.<r>.2/24``. Nothing is added to the root namespace (no bridge, no route, no interface), so the
root namespace's routing is untouched and concurrent test runs cannot collide: every pair is an island,
and every port is free in a fresh namespace. Each namespace has its own ``lo`` (brought up), so
``127.0.0.1`` inside a node is that node only; the root namespace's loopback is NOT reachable.

Teardown (also on exceptions, idempotent): every process group started through ``Node.popen``/``run``
that is still alive gets SIGKILL, then both namespaces are deleted (which destroys the veth pair).
At start, namespaces named ``<prefix>-<pid>-*`` whose ``pid`` is dead are deleted (left behind by a
killed test run).

Running torch.distributed across the two namespaces (torch 2.13 CPU build, checked here) -- exactly
what a multi-node launcher has to get right, because both "nodes" share one hostname (and /etc/hosts,
where that hostname maps to 127.0.0.1), as real hosts with a hostname resolving to loopback do:

1. ``--rdzv-endpoint <node0 IP>:<port>``: give the store host as the IP (or a name that resolves to
   it in every namespace), never the hostname / ``localhost`` -- those resolve to each node's own
   loopback.
2. ``--rdzv-conf is_host=1`` on the node at the endpoint address, ``is_host=0`` on the others. The
   c10d backend otherwise guesses whether it hosts the store with ``_matches_machine_hostname(host)``,
   which compares the endpoint with the addresses of ``gethostname()`` (here 127.0.0.1), NOT with the
   interface addresses: for ``10.231.x.1`` it answers False on node 0 too, nobody hosts the store and
   every agent fails with RendezvousConnectionError ("client socket has timed out ... trying to connect
   to (10.231.x.1, <port>)") after ``read_timeout``.
3. ``--local-addr <this node's IP>`` on EVERY node. The agent advertises ``local_addr or
   socket.getfqdn()`` as its node address; the rendezvous-rank-0 node (whichever node sorts first by
   that address -- ``--node-rank`` is ignored by c10d rendezvous) then starts the workers' TCPStore and
   publishes that address as the workers' ``MASTER_ADDR`` (the store is shared with the agent unless
   ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``; that path publishes the same address). ``--master-addr``
   is NOT used by c10d rendezvous (static backend only). Without ``--local-addr`` the address is
   ``getfqdn()`` -- "localhost" on this machine -- and the other node's workers dial their own loopback:
   "client socket has timed out ... trying to connect to (localhost, <port>)". Since any node can
   become rank 0, every node needs it. Rank 0 is the node whose address sorts first as a string
   ("10.0.0.10" < "10.0.0.9"), so keep addresses equal-length if node 0 must host the workers' store.
4. ``GLOO_SOCKET_IFNAME=<Node.iface>`` (and ``TP_SOCKET_IFNAME`` for tensorpipe/RPC) in the workers'
   environment: without it gloo picks the address of the hostname (loopback) for its pairs, which the
   peer node cannot reach ("Gloo connectFullMesh failed ... Connection refused, remote=[127.0.0.1]"). ``Node.env()`` / ``Node.popen`` set both by default. (``NCCL_SOCKET_IFNAME``
   is the NCCL equivalent; set it too for GPU jobs.)
5. Short timeouts so a broken setup fails fast instead of hanging for the defaults (join 600 s,
   process group 30 min): ``--rdzv-conf join_timeout=..,read_timeout=..``, ``--max-restarts 0``,
   ``init_process_group(timeout=timedelta(seconds=..))``.

``torchrun_argv`` builds such a command line.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterator, Mapping, Sequence

import psutil

DEFAULT_PREFIX = "pliant"
IFACE = "plnet0"  # the same name inside both namespaces (names are per namespace)
SUBNET_FIRST_OCTETS = "10.231"

_counter = itertools.count()


def _ip_binary() -> str | None:
    return shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip") if os.path.exists(p)),
                                      None)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    ip = _ip_binary()
    if ip is None:
        raise RuntimeError("iproute2 `ip` not found")
    res = subprocess.run([ip, *args], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({res.returncode}): {res.stderr.strip()}")
    return res


def list_namespaces() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    out = _ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Delete namespaces ``<prefix>-<pid>-*`` whose creating process is dead; returns their names."""
    pat = re.compile(rf"^{re.escape(prefix)}-(\d+)-\w+$")
    removed = []
    for name in list_namespaces():
        m = pat.match(name)
        if m and not _pid_alive(int(m.group(1))):
            if _ip("netns", "del", name, check=False).returncode == 0:
                removed.append(name)
    return removed


@lru_cache(maxsize=None)
def netns_available() -> str | None:
    """None if network namespaces (with a veth pair) can be created here, else why not (for pytest.skip)."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if _ip_binary() is None:
        return "iproute2 `ip` not found"
    a, b = f"{DEFAULT_PREFIX}-{os.getpid()}-probea", f"{DEFAULT_PREFIX}-{os.getpid()}-probeb"
    try:
        _ip("netns", "add", a)
        _ip("netns", "add", b)
        _ip("link", "add", IFACE, "netns", a, "type", "veth", "peer", "name", IFACE, "netns", b)
        _ip("-n", a, "link", "set", "lo", "up")
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot create network namespaces: {exc}"
    finally:
        for n in (a, b):
            _ip("netns", "del", n, check=False)
    return None


@dataclass
class Node:
    """One "node": a network namespace ``name`` with address ``addr`` on interface ``iface``.

    Bind gloo to ``iface``: ``GLOO_SOCKET_IFNAME=<iface>`` (``TP_SOCKET_IFNAME`` for tensorpipe); both
    are in ``env()``, which ``popen``/``run`` use.
    """

    name: str
    addr: str
    iface: str = IFACE
    _procs: list[subprocess.Popen] = field(default_factory=list, repr=False, compare=False)

    def env(self, extra: Mapping[str, str | None] | None = None) -> dict[str, str]:
        """os.environ + GLOO_SOCKET_IFNAME/TP_SOCKET_IFNAME=iface + ``extra`` (a None value removes a var)."""
        env = dict(os.environ)
        env["GLOO_SOCKET_IFNAME"] = self.iface
        env["TP_SOCKET_IFNAME"] = self.iface
        for k, v in (extra or {}).items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = str(v)
        return env

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside this namespace."""
        return [_ip_binary() or "ip", "netns", "exec", self.name, *map(str, argv)]

    def popen(self, argv: Sequence[str], env: Mapping[str, str | None] | None = None, **kw) -> subprocess.Popen:
        """Start ``argv`` inside the namespace, in its own session/process group (``os.killpg(p.pid, sig)``
        kills the node's whole tree), stdin from /dev/null. ``env`` is layered over ``self.env()``.
        Processes still alive when the network is torn down are killed."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("start_new_session", True)
        p = subprocess.Popen(self.argv(argv), env=self.env(env), **kw)
        self._procs.append(p)
        return p

    def run(self, argv: Sequence[str], env: Mapping[str, str | None] | None = None, timeout: float = 60,
            check: bool = False, capture_output: bool = True, text: bool = True, **kw) -> subprocess.CompletedProcess:
        """Blocking ``popen``; on timeout the process group is killed and TimeoutExpired raised."""
        if capture_output:
            kw.setdefault("stdout", subprocess.PIPE)
            kw.setdefault("stderr", subprocess.PIPE)
        p = self.popen(argv, env=env, text=text, **kw)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(p)
            out, err = p.communicate()
            raise subprocess.TimeoutExpired(p.args, timeout, out, err) from None
        res = subprocess.CompletedProcess(p.args, p.returncode, out, err)
        if check:
            res.check_returncode()
        return res

    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to every process started here and to all their descendants (also those
        that left the process group, as torchrun's workers do), and reap them."""
        for p in self._procs:
            if p.poll() is None:
                try:
                    tree = psutil.Process(p.pid).children(recursive=True)
                except psutil.NoSuchProcess:
                    tree = []
                kill_group(p, sig)
                for child in tree:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        child.send_signal(sig)
        for p in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)


def kill_group(p: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, sig)


class NodeNetwork:
    """Two namespaces joined by a veth pair; ``with NodeNetwork() as nodes`` or ``open()``/``close()``."""

    def __init__(self, prefix: str | None = None, count: int = 2):
        if count != 2:
            raise ValueError("a veth pair joins exactly two namespaces")
        self.prefix = prefix or DEFAULT_PREFIX
        self.nodes: list[Node] = []
        self._created: list[str] = []

    def open(self) -> list[Node]:
        reason = netns_available()
        if reason:
            raise RuntimeError(reason)
        cleanup_stale(self.prefix)
        k = next(_counter)
        subnet = f"{SUBNET_FIRST_OCTETS}.{random.randrange(256)}"
        names = [f"{self.prefix}-{os.getpid()}-{k}{c}" for c in "ab"]
        try:
            for n in names:
                _ip("netns", "add", n)
                self._created.append(n)
            _ip("link", "add", IFACE, "netns", names[0], "type", "veth", "peer", "name", IFACE, "netns", names[1])
            for i, n in enumerate(names):
                addr = f"{subnet}.{i + 1}"
                _ip("-n", n, "addr", "add", f"{addr}/24", "dev", IFACE)
                _ip("-n", n, "link", "set", "lo", "up")
                _ip("-n", n, "link", "set", IFACE, "up")
                self.nodes.append(Node(n, addr))
        except BaseException:
            self.close()
            raise
        return self.nodes

    def close(self) -> None:
        """Kill what the nodes started, delete the namespaces. Safe to call more than once."""
        for node in self.nodes:
            node.kill_all()
        while self._created:
            _ip("netns", "del", self._created.pop(), check=False)

    def __enter__(self) -> list[Node]:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def two_node_network(prefix: str | None = None) -> Iterator[list[Node]]:
    """Two namespaced nodes ``[n0, n1]`` (addresses ``.1`` and ``.2``), torn down on exit."""
    net = NodeNetwork(prefix)
    try:
        yield net.open()
    finally:
        net.close()


def torchrun_argv(node: Node, host: Node, nodes: Sequence[Node], script: Sequence[str], *, nproc_per_node: int,
                  run_id: str, port: int = 29400, join_timeout: int = 60, read_timeout: int = 30,
                  python: str = sys.executable) -> list[str]:
    """``python -m torch.distributed.run`` for ``node`` of a job rendezvousing at ``host`` (c10d backend),
    with the flags a multi-namespace job needs (module docstring: rendezvous IP, is_host, --local-addr)."""
    is_host = int(node.name == host.name)
    return [
        python, "-m", "torch.distributed.run",
        "--nnodes", str(len(nodes)), "--nproc-per-node", str(nproc_per_node),
        "--node-rank", str([n.name for n in nodes].index(node.name)),  # ignored by c10d, kept for logs
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{host.addr}:{port}", "--rdzv-id", run_id,
        "--rdzv-conf", f"is_host={is_host},join_timeout={join_timeout},read_timeout={read_timeout}",
        "--local-addr", node.addr,
        "--max-restarts", "0",
        *map(str, script),
    ]
