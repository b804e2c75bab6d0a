"""Communication counters: every collective the comm layer issues is recorded with its kind,
its group and the bytes this rank sent and received, so tests and benchmarks can read the
communication volume.

Volumes are the logical data each rank moves, independent of the algorithm the backend
uses: an AllGather of n bytes per rank in a group of s sends n to each of the s-1 peers and
receives as much; an all-to-all of n bytes keeps n/s and exchanges the rest; a
reduce-scatter of n input bytes sends (s-1)/s of it; point-to-point moves what it says.
"""
from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class CommRecord:
    calls: int = 0
    bytes_sent: int = 0
    bytes_recv: int = 0


@dataclass
class CommCounters:
    by_key: dict[tuple[str, str], CommRecord] = field(default_factory=lambda: defaultdict(CommRecord))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, kind: str, group: str, sent: int, recv: int) -> None:
        with self._lock:
            rec = self.by_key[kind, group]
            rec.calls += 1
            rec.bytes_sent += int(sent)
            rec.bytes_recv += int(recv)

    def reset(self) -> None:
        with self._lock:
            self.by_key.clear()

    def snapshot(self) -> dict[str, dict[str, int]]:
        """{"kind@group": {"calls", "bytes_sent", "bytes_recv"}}"""
        with self._lock:
            return {f"{k}@{g}": vars(r).copy() for (k, g), r in sorted(self.by_key.items())}

    def total(self, kind: str | None = None) -> CommRecord:
        with self._lock:
            out = CommRecord()
            for (k, _), r in self.by_key.items():
                if kind is None or k == kind:
                    out.calls += r.calls
                    out.bytes_sent += r.bytes_sent
                    out.bytes_recv += r.bytes_recv
            return out


COUNTERS = CommCounters()
