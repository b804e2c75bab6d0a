"""The agent's clock offset: the master's acknowledgements carry its clock, and the agent's
offset (master clock - its clock) must come out right to a few milliseconds, even when some
acknowledgements are late, because the master compares enter times across ranks with it
(a wrong offset makes an on-time rank look like a straggler, or a link look slow)."""
from __future__ import annotations

import threading
import time

import pytest
import zmq

from pliant.comm.monitor.agent import Agent
from pliant.comm.monitor import wire
from pliant.comm.monitor.recorder import CollectiveRecorder
from pliant.comm.monitor.spec import FaultSpec

pytestmark = pytest.mark.timeout(60)
AHEAD_S = 5.0  # the fake master's clock runs this far ahead of the agent's


def fake_master(sock: zmq.Socket, stop: threading.Event, late_every: int) -> None:
    """A ROUTER that acknowledges like the master does; every `late_every`-th ack is held 0.12 s."""
    n = 0
    while not stop.is_set():
        if not sock.poll(50):
            continue
        ident, payload = sock.recv_multipart()
        n += 1
        msg = wire.unpack(payload)
        if late_every and n % late_every == 0:
            time.sleep(0.12)
        ack = {"msg": msg.get("msg"), "t": time.monotonic() + AHEAD_S}
        sock.send_multipart([ident, wire.pack(ack)])


@pytest.mark.parametrize("late_every", [0, 2])
def test_offset_is_the_masters_clock(late_every):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()
    server = threading.Thread(target=fake_master, args=(sock, stop, late_every), daemon=True)
    server.start()
    agent = Agent(CollectiveRecorder(), f"tcp://127.0.0.1:{port}", 0, FaultSpec(report_interval_s=0.05))
    # started off the main thread: no SIGTERM handler is installed in the test process
    starter = threading.Thread(target=agent.start)
    starter.start()
    starter.join()
    try:
        deadline = time.monotonic() + 20
        while len(agent._clock) < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(agent._clock) >= 10, "the agent took no acknowledgements"
        assert abs(agent.offset - AHEAD_S) < 0.005, f"offset {agent.offset:.4f} s, want {AHEAD_S} s"
        rows = agent.summary()
        assert abs(rows["step_started"] - (agent.recorder.step_started + AHEAD_S)) < 0.005
    finally:
        agent.close()
        stop.set()
        server.join(timeout=5)
        sock.close(linger=0)
        ctx.term()


TERM_INSIDE_THE_LOCK = """
import os, signal, time, zmq
from pliant.comm.monitor.agent import Agent
from pliant.comm.monitor.recorder import CollectiveRecorder
from pliant.comm.monitor.spec import FaultSpec
master = zmq.Context().socket(zmq.ROUTER)
port = master.bind_to_random_port("tcp://127.0.0.1")
rec = CollectiveRecorder()
Agent(rec, f"tcp://127.0.0.1:{port}", 0, FaultSpec()).start()
with rec._lock:  # the training thread is inside the recorder's bookkeeping when SIGTERM lands
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
"""


def test_sigterm_while_the_training_thread_holds_the_recorders_lock_still_exits():
    """torchrun's SIGTERM can land while the main thread holds the recorder's lock (every
    collective takes it); the handler's goodbye takes a snapshot on that same thread, which
    with a plain lock waited for itself forever. The rank says goodbye and exits (143)."""
    import subprocess
    import sys

    started = time.monotonic()
    r = subprocess.run([sys.executable, "-c", TERM_INSIDE_THE_LOCK], capture_output=True, text=True, timeout=40)
    assert r.returncode == 143, r.stderr[-800:]
    assert time.monotonic() - started < 20
