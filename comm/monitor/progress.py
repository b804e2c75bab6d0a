"""Evidence that a rank makes progress (docs/faults.md, "Progress evidence"): a slow rank
is not a hung rank, and only a rank that shows no progress is called hung.

A rank's training runs on its main thread. It makes progress while that thread burns CPU,
moves bytes through read/write (a checkpoint loading) or changes its Python stack; it is
stuck while it does none of these (asleep before a collective, deadlocked on a lock,
frozen by SIGSTOP, sleeping in C with the GIL held, blocked in a collective that never
returns). Under load a rank that computes gets a small share of a core, but a share: its
CPU time still grows.

Two views of the same main thread:

* from inside (the agent, every report): its CPU clock (`pthread_getcpuclockid`), its
  read/write byte counters (/proc/self/task/TID/io) and its Python stack (innermost frames
  with their line numbers, read by the agent thread while it holds the GIL); plus the CPU
  of the rank's other threads but the agent's (gloo's, which move a collective's bytes);
* from outside (the master's process watch, for ranks on its host): the same thread's CPU
  and byte counters from /proc/PID/task/PID, which go on being readable while the rank is
  silent because it holds the GIL or is frozen; and, for the incident, its Python stack read
  by py-spy without its GIL.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

STACK_FRAMES = 12
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class ThreadSample:
    """One look at a thread: its CPU seconds, the bytes it passed to read/write, and (from
    inside only) a fingerprint of its Python stack."""

    cpu: float
    io: int
    stack: int | None = None
    state: str = ""  # from outside: R running, S sleeping, D disk, T stopped, Z zombie
    wait: float = 0.0  # from outside: seconds it spent runnable, waiting for a CPU (schedstat)


def _io_chars(path: str) -> int:
    try:
        with open(path) as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["rchar"]) + int(fields["wchar"])
    except (OSError, KeyError, ValueError):
        return 0


def _io_since(prev: "ThreadSample | None", cpu: float, min_cpu_s: float, path: str) -> int:
    """The thread's read/write bytes: the previous sample's when its CPU time grew by
    `min_cpu_s` since (that is progress already, and reading /proc/.../io costs the kernel
    60-100 us), else read from `path`."""
    if prev is not None and cpu - prev.cpu >= min_cpu_s > 0:
        return prev.io
    return _io_chars(path)


def stat_fields(path: str) -> list[str] | None:
    """The fields of a /proc stat file after the command name (which may hold spaces and
    parentheses): [0] the state letter, [11] and [12] utime and stime in clock ticks; None
    when it cannot be read (the process or thread is gone)."""
    try:
        with open(path) as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()


def read_thread(pid: int, tid: int | None = None, prev: ThreadSample | None = None,
                min_cpu_s: float = 0.0) -> ThreadSample | None:
    """A thread of another process seen through /proc (the main thread: tid = pid), or None
    when it is gone or /proc cannot be read. Given the previous sample, the byte counters are
    read only when the CPU time grew by less than `min_cpu_s` since it (more is progress
    already, and reading /proc/PID/task/TID/io costs the kernel 60-100 us: most of a look)."""
    tid = pid if tid is None else tid
    base = f"/proc/{pid}/task/{tid}"
    fields = stat_fields(f"{base}/stat")
    if fields is None:
        return None
    state, utime, stime = fields[0], int(fields[11]), int(fields[12])
    cpu, wait = (utime + stime) / TICK, 0.0
    try:  # nanoseconds on a CPU and waiting in the run queue (absent without CONFIG_SCHED_INFO)
        with open(f"{base}/schedstat") as f:
            on_cpu, queued = f.read().split()[:2]
        cpu, wait = int(on_cpu) / 1e9, int(queued) / 1e9
    except (OSError, ValueError):
        pass
    return ThreadSample(cpu, _io_since(prev, cpu, min_cpu_s, f"{base}/io"), None, state, wait)


def format_stack(frame, limit: int = STACK_FRAMES) -> list[str]:
    """The innermost `limit` frames from `frame` (of this process; call it holding the GIL),
    innermost first, as 'file:line function'."""
    out = []
    while frame is not None and len(out) < limit:
        code = frame.f_code
        out.append(f"{os.path.basename(code.co_filename)}:{frame.f_lineno} {code.co_name}")
        frame = frame.f_back
    return out


def stack_key(thread_id: int, limit: int = STACK_FRAMES) -> tuple[int | None, object]:
    """A fingerprint of a thread's innermost `limit` frames (code and line; the same within a
    process), and its innermost frame, formatted only when needed."""
    top = frame = sys._current_frames().get(thread_id)
    if frame is None:
        return None, None
    parts = []
    while frame is not None and len(parts) < limit:
        parts.append((id(frame.f_code), frame.f_lineno))
        frame = frame.f_back
    return hash(tuple(parts)), top


class MainThreadProbe:
    """The agent's view of its rank's main thread (build it on any thread, sample it from the agent's)."""

    def __init__(self, min_cpu_s: float = 0.0) -> None:
        """`min_cpu_s`: CPU growth that is progress by itself (the byte counters are then not read)."""
        main = threading.main_thread()
        self.min_cpu_s = min_cpu_s
        self._last: ThreadSample | None = None
        self.ident, self.native_id = main.ident, main.native_id
        self._clock = time.pthread_getcpuclockid(self.ident) if hasattr(time, "pthread_getcpuclockid") else None
        self._io_path = f"/proc/self/task/{self.native_id}/io"
        self._last_stack: int | None = None
        self._given: int | None = None  # the stack whose frames were given last

    def sample(self) -> tuple[ThreadSample, list[str] | None, float]:
        """The main thread's sample; its frames when its stack is the one of the previous sample
        and they were not given yet (where a stuck thread waits: while it runs, its stack
        changes between samples and formatting it every time cost the agent most of a report);
        and the CPU seconds of the rank's other threads but the caller's."""
        cpu = time.clock_gettime(self._clock) if self._clock is not None else 0.0
        key, top = stack_key(self.ident)
        frames = None
        if key is not None and key == self._last_stack and key != self._given:
            frames, self._given = format_stack(top), key
        self._last_stack = key
        other = time.process_time() - cpu - time.thread_time()
        self._last = ThreadSample(cpu, _io_since(self._last, cpu, self.min_cpu_s, self._io_path), key)
        return self._last, frames, other


@dataclass
class ThreadProgress:
    """When a thread last showed progress (on the master's clock), from one view's samples:
    CPU grown by at least `min_cpu_s`, bytes moved, the stack changed, or (from outside) it
    is runnable (state R) or spent as much time in the run queue: a thread that waits for a CPU
    on a loaded host is starved, not stuck (a stopped, sleeping or deadlocked thread never
    queues for a CPU, and a spinning one burns it). The kernel adds a wait to the thread's
    run-queue total only when the thread gets the CPU, so a thread starved for seconds shows
    it by its state."""

    min_cpu_s: float
    last: ThreadSample | None = None
    since: float | None = None  # the last time progress was seen; None: no samples yet
    base_cpu: float = 0.0  # CPU at the last progress (small growths add up)
    base_wait: float = 0.0  # run-queue wait at the last progress

    def update(self, sample: ThreadSample, now: float) -> bool:
        prev, self.last = self.last, sample
        if prev is None:
            self.since, self.base_cpu, self.base_wait = now, sample.cpu, sample.wait
            return True
        moved = (sample.cpu - self.base_cpu >= self.min_cpu_s - 1e-6 or sample.io != prev.io or  # one /proc tick
                 sample.state == "R" or sample.wait - self.base_wait >= self.min_cpu_s - 1e-6 or
                 (sample.stack is not None and prev.stack is not None and sample.stack != prev.stack))
        if moved:
            self.since, self.base_cpu, self.base_wait = now, sample.cpu, sample.wait
        return moved


def py_spy_stack(pid: int, timeout_s: float = 3.0) -> list[str] | str:
    """The Python stack of every thread of `pid` read from outside, without its GIL (py-spy
    dump --nonblocking); a string saying why when it cannot be read."""
    exe = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(exe):
        return "py-spy is not installed"
    try:
        out = subprocess.run([exe, "dump", "--pid", str(pid), "--nonblocking"], capture_output=True, text=True,
                             timeout=timeout_s)
    except (subprocess.TimeoutExpired, OSError) as e:
        return f"py-spy dump failed: {e}"
    if out.returncode != 0:
        return f"py-spy dump failed (status {out.returncode}): {out.stderr.strip()[-300:]}"
    return [line.rstrip() for line in out.stdout.splitlines() if line.strip()][:60]
