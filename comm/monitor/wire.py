"""The monitor's messages on the wire (agents, node agents, master): MessagePack, one ZeroMQ
frame per message. A report carries one row per collective; MessagePack packs and parses such
a row in about a fifth of JSON's time and half its bytes, which on a job that issues a
collective every half millisecond of rank CPU is most of what the monitor's messages cost."""
from __future__ import annotations

import sys
from typing import Any

import msgpack
import zmq

# unanswered this long after connecting, an agent or node agent opens a new connection to the
# master (ZeroMQ's lazy pirate): a connection accepted by something that never answers (a
# half-open leftover of the previous start's master) is not held for ZeroMQ's handshake timeout
RECONNECT_S = 5.0


def dealer(ctx: zmq.Context, addr: str, identity: str) -> zmq.Socket:
    """An agent's socket to the master: summaries dropped, never blocking, when the master is
    gone (a send high-water mark of 64), the last one flushed for 0.5 s at close."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 500)
    sock.setsockopt(zmq.SNDHWM, 64)
    sock.setsockopt(zmq.IDENTITY, identity.encode())
    sock.connect(addr)
    return sock


def pack(body: dict[str, Any]) -> bytes:
    """MessagePack; a string that is not valid Unicode (a file name's undecodable bytes in a
    stack frame or an exception's text) goes with '?' in place of what cannot be encoded."""
    return msgpack.packb(body, unicode_errors="replace")


def unpack(payload: bytes) -> dict[str, Any]:
    """A message; ValueError for one that is not a MessagePack map."""
    try:
        body = msgpack.unpackb(payload, strict_map_key=False)  # an incident's evidence may key by rank
    except (msgpack.UnpackException, ValueError) as e:
        raise ValueError(f"not a monitor message: {e}") from e
    if not isinstance(body, dict):
        raise ValueError(f"not a monitor message: a {type(body).__name__}, not a map")
    return body


def send(sock: zmq.Socket, body: dict[str, Any]) -> bool:
    """Without blocking; False when the peer's queue is full (the message is dropped) or the
    body holds what MessagePack cannot carry (a bug: said on stderr, never raised into the
    training it monitors)."""
    try:
        data = pack(body)
    except (TypeError, ValueError, OverflowError) as e:
        print(f"pliant monitor: a {body.get('type', 'message')} could not be packed ({type(e).__name__}: {e})",
              file=sys.stderr, flush=True)
        return False
    try:
        sock.send(data, flags=zmq.NOBLOCK)
    except zmq.Again:
        return False
    return True


def receive(sock: zmq.Socket) -> dict[str, Any]:
    """Without blocking: raises zmq.Again when nothing is there."""
    return unpack(sock.recv(flags=zmq.NOBLOCK))


def waiting(sock: zmq.Socket) -> bool:
    """Is a message queued? (Cheaper than a receive that raises zmq.Again: pyzmq's exception
    costs more than a small message.)"""
    return bool(sock.get(zmq.EVENTS) & zmq.POLLIN)
