"""The recorder on CUDA + NCCL (one rank: NCCL needs a GPU per rank): a collective's enter and
exit are when the device ran it, not when the host queued it; one started and not ended is in
flight; the finiteness flag is read without waiting for the device; a snapshot never blocks
on a busy device. Skipped without a GPU."""
from __future__ import annotations

import socket
import time

import pytest
import torch
import torch.distributed as dist

from pliant.comm.monitor.recorder import CollectiveRecorder, DeviceClock

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.timeout(120)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def nccl():
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def cycles_per_s(nccl) -> float:
    """torch.cuda._sleep spins for a number of clock cycles: how many make a second here."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1000)
    start.record()
    torch.cuda._sleep(50_000_000)
    end.record()
    end.synchronize()
    return 50_000_000 / (start.elapsed_time(end) / 1e3)


def busy(cycles_per_s: float, seconds: float) -> None:
    torch.cuda._sleep(int(cycles_per_s * seconds))


def _events(rec: CollectiveRecorder):
    snap = rec.snapshot()
    return snap, [e for e in snap["events"] if e.op == "all_reduce"]


def test_enter_and_exit_are_device_times(nccl, cycles_per_s):
    with CollectiveRecorder() as rec:
        x = torch.ones(1024, device="cuda")
        dist.all_reduce(x)  # warm-up: NCCL's communicator, the clock's anchor
        torch.cuda.synchronize()
        rec.snapshot()  # a snapshot reports what changed since the previous one: not the warm-up
        t0 = time.monotonic()
        busy(cycles_per_s, 0.5)
        dist.all_reduce(x)
        queued = time.monotonic()
        assert queued - t0 < 0.25, "the host does not wait for the device"
        snap, seen = _events(rec)
        assert seen == [] and snap["inflight"] == {}, "queued behind 0.5 s of compute: not entered yet"
        assert time.monotonic() - queued < 0.25, "a snapshot does not wait for the device"
        torch.cuda.synchronize()
        done = time.monotonic()
        _, seen = _events(rec)
        assert len(seen) == 1
        e = seen[0]
        assert e.seq == 1 and e.group == (0,) and e.nbytes == 4096 and e.finite is True
        assert 0.4 < e.enter - t0 < done - t0 + 0.01, (e.enter - t0, done - t0)
        assert e.enter <= e.exit <= done + 0.01
        assert e.exit - e.enter < 0.1


def test_started_and_not_ended_is_in_flight(nccl, cycles_per_s):
    with CollectiveRecorder() as rec:
        x = torch.ones(256, device="cuda")
        dist.all_reduce(x)
        torch.cuda.synchronize()
        work = dist.all_reduce(x, async_op=True)
        busy(cycles_per_s, 0.6)  # the caller's stream is busy until it waits on the work
        work.wait()  # the end event goes behind the busy spell
        time.sleep(0.2)
        snap, seen = _events(rec)
        assert list(snap["inflight"]) == [(0,)] and snap["inflight"][(0,)].seq == 1
        assert snap["inflight"][(0,)].exit is None
        torch.cuda.synchronize()
        snap, seen = _events(rec)
        assert snap["inflight"] == {} and [e.seq for e in seen] == [1]  # seq 0 ended before the first snapshot
        assert seen[0].exit - seen[0].enter > 0.4


def test_finiteness_flag_per_collective(nccl):
    with CollectiveRecorder() as rec:
        good, bad = torch.ones(8, device="cuda"), torch.ones(8, device="cuda")
        bad[3] = float("nan")
        dist.all_reduce(good)
        dist.all_reduce(bad)
        dist.all_reduce(torch.full((4,), float("inf"), device="cuda", dtype=torch.float64))
        torch.cuda.synchronize()
        _, seen = _events(rec)
        assert [(e.finite, e.dtype) for e in seen] == [(True, "float32"), (False, "float32"), (False, "float64")]


def test_clock_anchor_renewal_keeps_times_on_the_host_clock(nccl, cycles_per_s, monkeypatch):
    monkeypatch.setattr(DeviceClock, "renew_s", 0.0)
    with CollectiveRecorder() as rec:
        x = torch.ones(64, device="cuda")
        for step in range(3):
            dist.all_reduce(x)
            torch.cuda.synchronize()
            rec.mark_step(step)  # idle stream: a new anchor each step
            before = time.monotonic()
            dist.all_reduce(x)
            torch.cuda.synchronize()
            after = time.monotonic()
            _, seen = _events(rec)
            assert seen and before - 0.005 <= seen[-1].enter <= seen[-1].exit <= after + 0.005
