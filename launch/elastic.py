"""torchrun with its workers forked from a preloaded fork server: `python -m pliant.launch.elastic
<torchrun arguments> --run-path --start-method forkserver WORKER.py ...`.

This is torch.distributed.run itself (the same arguments, rendezvous, agent, restarts and exit
status); only where its workers come from differs. torchrun starts each worker as a new Python
that imports torch, TorchDynamo (every torch optimizer imports it) and DeepSpeed on its own: 4 s
of CPU per rank, 4 ranks at once on the same cores. With `--run-path --start-method forkserver`
torchrun runs the worker script in a process forked from multiprocessing's fork server; here that
server is started first, with pliant.launch.preload as its preload, so that it imports those
once, while torchrun's own agent imports torch beside it, and every worker is a fork of it
(4-rank one-step job on 2 CPU cores: 20 s -> 9 s). $PLIANT_PRELOAD=0 turns the preload off
(plain `torchrun` then starts the same job, slower); see launch/torchrun.py.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import time
from multiprocessing import forkserver

PRELOAD = "pliant.launch.preload"
AFTER_ENV = "PLIANT_START_AFTER"  # pids (comma-separated) whose exit the rendezvous waits for
AFTER_TIMEOUT_S = 120.0


def main(argv: list[str] | None = None) -> int:
    after = processes([int(p) for p in os.environ.pop(AFTER_ENV, "").split(",") if p])
    multiprocessing.set_forkserver_preload([PRELOAD])
    forkserver.ensure_running()  # a new Python imports the preload while this one imports torch
    from torch.distributed.run import main as torchrun_main

    wait_for_exit(after)
    torchrun_main(sys.argv[1:] if argv is None else argv)
    return 0


def processes(pids: list[int]) -> list:
    """The processes of these pids that still exist, taken now (psutil.Process): a pid reused
    later is not theirs."""
    import psutil

    out = []
    for pid in pids:
        try:
            out.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    return out


def process_tree(pid: int) -> list:
    """The process `pid` and every process under it (psutil.Process), taken now."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def running(p) -> bool:
    """Whether psutil.Process `p` still runs. A zombie has exited: its parent may be gone too and
    the zombie left to an init that reaps late, which psutil.wait_procs would wait out."""
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(procs: list, timeout_s: float) -> list:
    """Wait until none of `procs` runs; returns those still running after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        procs = [p for p in procs if running(p)]
        if not procs or time.monotonic() >= deadline:
            return procs
        time.sleep(0.02)


def wait_for_exit(procs: list, timeout_s: float = AFTER_TIMEOUT_S) -> None:
    """A restart's launcher is started while the failed start is being stopped, so that its
    preload overlaps the stop; its ranks start only once every process of that start (`procs`)
    has exited, or after `timeout_s` (the supervisor has SIGKILLed them by then)."""
    left = wait_gone(procs, timeout_s)
    if left:
        print(f"pliant: processes {[p.pid for p in left]} of the previous start are still running after "
              f"{timeout_s:.0f} s; starting anyway", file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
