"""Progress evidence from outside a rank (comm/monitor/progress.py), on real processes: a
thread starved of CPU on a loaded host (runnable, waiting in the run queue) is not stuck,
while a sleeping or stopped one is."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from pliant.comm.monitor.progress import ThreadProgress, read_thread

pytestmark = pytest.mark.timeout(60)
SPIN = "import time\nwhile True: pass"


def spinner(cpu: int, idle: bool = False) -> subprocess.Popen:
    """A process that spins on `cpu`; with `idle`, under SCHED_IDLE (it runs only when
    nothing else wants that CPU: beside another spinner it is starved)."""
    code = (f"import os\nos.sched_setaffinity(0, {{{cpu}}})\n"
            + ("os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n" if idle else "") + SPIN)
    return subprocess.Popen([sys.executable, "-c", code])


def watch(pid: int, seconds: float, every: float = 0.2) -> ThreadProgress:
    # a threshold above the starved thread's CPU over the whole watch (about 0.05 s in 2.5 s
    # here): its progress can only come from its time in the run queue
    p = ThreadProgress(min_cpu_s=0.1)
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        sample = read_thread(pid)
        assert sample is not None
        p.update(sample, time.monotonic())
        time.sleep(every)
    return p


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/schedstat"),
                    reason="needs /proc/PID/task/TID/schedstat (CONFIG_SCHED_INFO)")
def test_a_starved_thread_is_waiting_not_stuck_and_a_stopped_one_is_stuck():
    cpu = sorted(os.sched_getaffinity(0))[0]
    busy, starved = spinner(cpu), spinner(cpu, idle=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time\ntime.sleep(60)"])
    try:
        time.sleep(0.5)  # both started, and the idle one already losing the CPU
        before = read_thread(starved.pid)
        p = watch(starved.pid, 2.5)
        after = p.last
        assert after.state == "R"
        # runnable, queued (the kernel adds a wait to the total only when the thread gets the CPU)
        assert after.wait > before.wait, (before, after)
        assert after.cpu - before.cpu < 0.5, (before, after)  # starved: well under a fifth of the 2.5 s
        assert time.monotonic() - p.since < 1.0  # ... and so not stuck
        os.kill(starved.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 20  # a starved thread stops once it gets a CPU (on a busy machine: seconds)
        while read_thread(starved.pid).state != "T" and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # its last run-queue wait is accounted when it leaves the queue
        p = watch(starved.pid, 2.5)
        assert p.last.state == "T" and time.monotonic() - p.since > 2.0  # stopped: no CPU, no queueing
        p = watch(sleeper.pid, 2.5)
        assert time.monotonic() - p.since > 2.0  # asleep (as before a collective that never comes)
    finally:
        for proc in (busy, starved, sleeper):
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
