"""A pool of real processes joined in a gloo process group, kept alive across test cases.

Starting processes and a process group costs seconds, so a test module starts one pool per
world size and sends it jobs: `pool.run("dist_jobs:fn", *args)` runs `fn(ctx, *args)` on
every rank and returns the per-rank results. A failure on any rank is raised in the test
with that rank's traceback; a rank that does not answer within the timeout fails the test
instead of hanging it (and the process group's own timeout is short, too).
"""
from __future__ import annotations

import datetime
import importlib
import multiprocessing as mp
import os
import queue
import socket
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

TESTS = str(Path(__file__).resolve().parent)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class WorkerContext:
    rank: int
    world: int
    registry: object  # pliant.comm.groups.GroupRegistry


def _worker(rank: int, world: int, port: int, inbox, outbox, pg_timeout_s: float) -> None:
    sys.path.insert(0, TESTS)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=pg_timeout_s))
    from pliant.comm.groups import GroupRegistry

    ctx = WorkerContext(rank, world, GroupRegistry())
    while True:
        job = inbox.get()
        if job is None:
            break
        name, args = job
        try:
            module, fn = name.split(":")
            result = getattr(importlib.import_module(module), fn)(ctx, *args)
            outbox.put((rank, True, result))
        except BaseException:  # noqa: BLE001 - reported to the test
            outbox.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class DistPool:
    def __init__(self, world: int, timeout_s: float = 120.0, pg_timeout_s: float = 60.0):
        ctx = mp.get_context("spawn")
        self.world, self.timeout_s = world, timeout_s
        port = free_port()
        self.inboxes = [ctx.Queue() for _ in range(world)]
        self.outbox = ctx.Queue()
        self.procs = [ctx.Process(target=_worker, args=(r, world, port, self.inboxes[r], self.outbox, pg_timeout_s),
                                  daemon=True) for r in range(world)]
        for p in self.procs:
            p.start()

    def run(self, job: str, *args):
        for box in self.inboxes:
            box.put((job, args))
        results: dict[int, object] = {}
        errors: list[str] = []
        for _ in range(self.world):
            try:
                rank, ok, value = self.outbox.get(timeout=self.timeout_s)
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                raise AssertionError(f"{job}: ranks {sorted(set(range(self.world)) - set(results))} did not answer "
                                     f"within {self.timeout_s} s (dead: {dead})") from None
            if ok:
                results[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
        if errors:
            raise AssertionError(f"{job} failed on {len(errors)} rank(s):\n" + "\n".join(errors))
        return [results[r] for r in range(self.world)]

    def close(self) -> None:
        for box in self.inboxes:
            box.put(None)
        for p in self.procs:
            p.join(timeout=20)
            if p.is_alive():
                p.terminate()
