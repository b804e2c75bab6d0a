"""Where a rank's agent finds its master (no torch: the supervisor sets these)."""
from __future__ import annotations

import os
import sys
import time

MONITOR_ADDR_ENV = "PLIANT_MONITOR_ADDR"
# or the file the master writes its address to once it listens: a job started beside its master
MONITOR_ADDR_FILE_ENV = "PLIANT_MONITOR_ADDR_FILE"


def master_address(timeout_s: float = 60.0) -> str | None:
    """Where this rank's agent reports: $PLIANT_MONITOR_ADDR, else the address in
    $PLIANT_MONITOR_ADDR_FILE once the master has written it (waiting up to `timeout_s`; the
    master starts beside the job, and a rank reaches this after its imports), else None."""
    addr = os.environ.get(MONITOR_ADDR_ENV)
    path = os.environ.get(MONITOR_ADDR_FILE_ENV)
    if addr or not path:
        return addr or None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            text = open(path).read().strip()
        except FileNotFoundError:
            text = ""
        if text:
            return text
        time.sleep(0.02)
    print(f"pliant monitor: no master address in {path} after {timeout_s:.0f} s: this rank runs unmonitored",
          file=sys.stderr, flush=True)
    return None
