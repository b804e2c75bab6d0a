"""A busy machine on demand, for `pliant bench faults --stress N`.

`stress(n_cpu, disk_dir)` starts `n_cpu` processes that each spin a tight Python loop (one
core's worth of runnable work apiece, at the same priority as the job under test) and, with
`disk_dir`, one process that writes a few MB into a file there and fsyncs it, over and over.
They are processes, not threads: threads in this interpreter would share one GIL and load
at most one core. On exit (normal or by an exception) every one of them is stopped, killed
if need be, reaped, and checked gone with psutil; the disk file is deleted. While they run,
a thread samples the machine's load average so that a report can say how busy it was.

Every child also watches its parent: if the bench itself is killed (SIGKILL, no cleanup),
the children notice within a fraction of a second that they were re-parented and exit, so a
dead bench leaves no burners behind.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import psutil

DISK_FILE = "stress-disk.bin"

# A burner: count in a tight loop; every ~10^6 iterations (tens of ms) check that the parent
# that started it is still its parent, and exit otherwise.
_BURN = """
import os, sys
parent = int(sys.argv[1])
while os.getppid() == parent:
    for _ in range(1_000_000):
        pass
"""

# The disk hammer: write MB megabytes (random, so that nothing can compress them away) to
# PATH from the start, fsync, again; same parent check between writes.
_HAMMER = """
import os, sys
parent, path, mb = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
block = os.urandom(1 << 20)
fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
while os.getppid() == parent:
    os.lseek(fd, 0, os.SEEK_SET)
    for _ in range(mb):
        os.write(fd, block)
    os.fsync(fd)
os.close(fd)
os.unlink(path)  # the parent is gone (its cleanup would have stopped this process first)
"""


@dataclass
class StressInfo:
    """What was started, and what the machine looked like meanwhile."""
    n_cpu: int
    disk_file: Path | None
    pids: list[int] = field(default_factory=list)  # burners first, then the disk hammer
    started: float = 0.0
    ended: float | None = None
    load1: list[float] = field(default_factory=list)  # os.getloadavg()[0] samples
    runnable: list[int] = field(default_factory=list)  # /proc/loadavg's running tasks: the load right now
    cpu_s: float | None = None  # CPU seconds the burners got, read just before they were stopped
    disk_mb_written: float | None = None  # what the hammer wrote (psutil io_counters)
    survivors: list[int] = field(default_factory=list)  # pids still alive after the stop: should stay empty

    def summary(self) -> dict:
        def stats(xs):
            return (round(statistics.median(xs), 2), round(max(xs), 2)) if xs else (None, None)

        (l_med, l_max), (r_med, r_max) = stats(self.load1), stats(self.runnable)
        return {"cpu_burners": self.n_cpu, "disk_hammer": self.disk_file is not None,
                "seconds": round((self.ended or time.time()) - self.started, 1), "samples": len(self.load1),
                "load1_median": l_med, "load1_max": l_max, "runnable_median": r_med, "runnable_max": r_max,
                "burner_cpu_s": None if self.cpu_s is None else round(self.cpu_s, 1),
                "disk_mb_written": None if self.disk_mb_written is None else round(self.disk_mb_written, 1),
                "survivors": self.survivors}


def _runnable() -> int | None:
    """Tasks running or runnable now (Linux's /proc/loadavg, 4th field 'R/total'), minus
    the reader itself; None elsewhere."""
    try:
        return int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]) - 1
    except (OSError, IndexError, ValueError):
        return None


def _sample(info: StressInfo, stop: threading.Event, every_s: float) -> None:
    while True:
        info.load1.append(os.getloadavg()[0])
        r = _runnable()
        if r is not None:
            info.runnable.append(r)
        if stop.wait(every_s):
            return


def _spawn(script: str, *args: str) -> subprocess.Popen:
    # -I: isolated (no site-packages, no user env), quick to start; output thrown away
    return subprocess.Popen([sys.executable, "-I", "-c", script, str(os.getpid()), *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop(procs: list[subprocess.Popen], grace_s: float = 2.0) -> list[int]:
    """SIGTERM all, SIGKILL what is left after grace_s, reap all; the pids psutil still sees
    running (not zombies) afterwards."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    alive = []
    for p in procs:
        try:  # a reaped pid may be reused by an unrelated process: compare its parent too
            q = psutil.Process(p.pid)
            if q.ppid() == os.getpid() and q.status() != psutil.STATUS_ZOMBIE:
                alive.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return alive


@contextmanager
def stress(n_cpu: int, disk_dir: Path | None = None, disk_mb: int = 4, sample_s: float = 1.0,
           warmup_s: float = 0.0) -> Iterator[StressInfo]:
    """Run `n_cpu` CPU burners (and, with `disk_dir`, a disk hammer writing `disk_mb` MB +
    fsync in a loop to `disk_dir`/stress-disk.bin) for the duration of the block. `warmup_s`:
    wait that long after starting them, so that the block begins on a machine already busy."""
    if n_cpu < 0:
        raise ValueError(f"n_cpu must be >= 0, got {n_cpu}")
    disk_file = Path(disk_dir) / DISK_FILE if disk_dir is not None else None
    info = StressInfo(n_cpu, disk_file, started=time.time())
    procs: list[subprocess.Popen] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample, args=(info, stop, sample_s), name="stress-load", daemon=True)
    try:
        procs += [_spawn(_BURN) for _ in range(n_cpu)]
        if disk_file is not None:
            disk_file.parent.mkdir(parents=True, exist_ok=True)
            procs.append(_spawn(_HAMMER, str(disk_file), str(disk_mb)))
        info.pids = [p.pid for p in procs]
        sampler.start()
        if warmup_s > 0:
            time.sleep(warmup_s)
        yield info
    finally:
        # what the children did, read while they still exist
        burned, written = 0.0, None
        for i, p in enumerate(procs):
            try:
                q = psutil.Process(p.pid)
                if i < n_cpu:
                    t = q.cpu_times()
                    burned += t.user + t.system
                else:
                    written = q.io_counters().write_bytes / 2 ** 20
            except (psutil.Error, AttributeError):  # gone already; io_counters is not on every OS
                pass
        info.cpu_s, info.disk_mb_written = (burned if n_cpu else None), written
        info.survivors = _stop(procs)
        stop.set()
        if sampler.is_alive():
            sampler.join()
        info.ended = time.time()
        if disk_file is not None:
            disk_file.unlink(missing_ok=True)
