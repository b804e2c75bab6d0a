"""A node agent registers with its master even when its first connection leads nowhere: a
connection accepted by something that never answers (a half-open leftover of the previous
start's master, a listener that is not the master) is dropped after RECONNECT_S, not held
until ZeroMQ's 30 s handshake timeout (comm/monitor/wire.py)."""
from __future__ import annotations

import socket
import threading
import time

import pytest
import zmq

from pliant.comm.monitor import wire
from pliant.comm.monitor.node_agent import NodeAgent
from pliant.comm.monitor.wire import RECONNECT_S

pytestmark = pytest.mark.timeout(60)


def test_an_unanswered_first_connection_is_replaced():
    silent = socket.socket()
    silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    port = silent.getsockname()[1]
    agent = NodeAgent(f"tcp://127.0.0.1:{port}", node=1, host="h", attempt=0, report_interval_s=0.2,
                      master_timeout_s=30)
    held, _ = silent.accept()  # the agent's first connection: accepted, never answered
    silent.close()
    ctx = zmq.Context()
    master = ctx.socket(zmq.ROUTER)
    master.setsockopt(zmq.LINGER, 0)
    master.bind(f"tcp://127.0.0.1:{port}")  # the real master takes the port
    stop = threading.Event()

    def answer():
        while not stop.is_set():
            if master.poll(50):
                ident, payload = master.recv_multipart()
                msg = wire.unpack(payload)
                master.send_multipart([ident, wire.pack({"msg": msg.get("msg"), "t": time.monotonic(), "attempt": 0})])

    thread = threading.Thread(target=answer)
    thread.start()
    started = time.monotonic()
    try:
        agent.register(timeout_s=25)
        took = time.monotonic() - started
        assert took < RECONNECT_S + 5, f"registered after {took:.1f} s: the first connection was waited out"
    finally:
        agent.close()
        stop.set()
        thread.join()
        held.close()
        master.close()
        ctx.term()


def test_a_message_msgpack_cannot_carry_is_dropped_never_raised(capsys):
    """An exception's text or a stack frame's file name with undecodable bytes goes with '?'
    (a rank's goodbye must go out); a body with an object MessagePack cannot pack is dropped
    with a line on stderr, not raised into the training thread or the agent's."""
    assert wire.unpack(wire.pack({"reason": "bad \udcff name"}))["reason"] == "bad ? name"
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        assert wire.send(sock, {"type": "report", "x": object()}) is False
        assert "could not be packed" in capsys.readouterr().err
    finally:
        sock.close()
        ctx.term()
