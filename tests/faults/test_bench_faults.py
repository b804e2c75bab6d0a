"""`pliant bench faults` end to end on one class and one torchft fault: it writes the JSON
with the summary the issue asks for, localises the crash, raises no alarm under jitter, and
measures torchft's crashed replica beside it. And bench/stress.py, the busy machine of
`--stress N`: its burners burn, its disk hammer writes, and nothing outlives it."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pliant.bench.fault_runs import DETECT_S, environment
from pliant.bench.faults_bench import STRESS_KEYS
from pliant.bench.stress import DISK_FILE, stress
from pliant.comm.monitor.progress import read_thread


def test_stress_burns_cpu_hammers_disk_and_leaves_nothing(tmp_path: Path) -> None:
    with stress(2, tmp_path, sample_s=0.2) as info:
        procs = [psutil.Process(p) for p in info.pids]
        assert len(procs) == 3 and all(p.is_running() and p.ppid() == psutil.Process().pid for p in procs)
        # a burner always wants a core: its time on a CPU plus its time waiting in the run queue
        # (schedstat) is the whole second, however little of a core the machine's other work
        # (the suite's other worker) leaves it; a burner that slept would not queue
        first = [read_thread(p.pid) for p in procs[:2]]
        time.sleep(1.0)
        later = [read_thread(p.pid) for p in procs[:2]]
        runnable = [(b.cpu - a.cpu) + (b.wait - a.wait) for a, b in zip(first, later)]
        assert all(r > 0.8 for r in runnable), runnable
        assert all(b.cpu > a.cpu for a, b in zip(first, later))  # and it got some CPU
        assert (tmp_path / DISK_FILE).is_file()
    assert not (tmp_path / DISK_FILE).exists()
    assert not [p.pid for p in procs if p.is_running()]  # reaped: not even zombies
    s = info.summary()
    assert s["survivors"] == [] and s["cpu_burners"] == 2 and s["disk_hammer"] is True
    assert s["samples"] >= 3 and s["load1_max"] is not None and s["burner_cpu_s"] > 0
    assert s["disk_mb_written"] is None or s["disk_mb_written"] > 0


def test_stress_stops_its_processes_on_an_exception() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with stress(1, None) as info:
            procs = [psutil.Process(p) for p in info.pids]
            raise RuntimeError("boom")
    assert len(procs) == 1 and not procs[0].is_running()  # is_running: the same process (pid and start time)


def test_stress_processes_exit_when_the_bench_is_killed(tmp_path: Path) -> None:
    """A bench killed with SIGKILL runs no cleanup: its burners and hammer notice the new
    parent and exit by themselves."""
    code = ("import sys, time; from pathlib import Path; from pliant.bench.stress import stress\n"
            "with stress(2, Path(sys.argv[1])) as info:\n"
            "    print(*info.pids, flush=True); time.sleep(60)\n")
    bench = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    procs = [psutil.Process(int(p)) for p in bench.stdout.readline().split()]
    assert len(procs) == 3
    bench.kill()
    bench.wait()

    def gone(p: psutil.Process) -> bool:
        try:
            return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    deadline = time.monotonic() + 10
    while not all(gone(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(gone(p) for p in procs)
    while (tmp_path / DISK_FILE).exists() and time.monotonic() < deadline:  # the hammer removes its file
        time.sleep(0.1)
    assert not (tmp_path / DISK_FILE).exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_faults_writes_summary_and_torchft_side_by_side(tmp_path: Path) -> None:
    out = tmp_path / "faults.json"
    cmd = [sys.executable, "-m", "pliant.launch.cli", "bench", "faults", "--classes", "crash", "--repeats", "1",
           "--overhead-steps", "6", "--overhead-repeats", "1", "--jitter-steps", "6", "--torchft-faults", "crash", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=560, env=environment([]))
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    body = json.loads(out.read_text())
    s = body["summary"]
    assert {"classes", "all_localised", "max_detection_s_hang_crash", "overhead_ratio", "false_alarms"} <= set(s)
    assert s["classes"] == 1 and s["all_localised"] is True
    assert all(s[k] is None for k in STRESS_KEYS) and body["stress"] is None  # no --stress: keys there, null
    assert 0 < s["max_detection_s_hang_crash"] < DETECT_S
    assert s["false_alarms"] == 0 and body["false_alarm_run"]["steps_done"] == 6
    assert s["overhead_ratio"] > 0
    # the monitor's CPU, read by its ranks and master; the paired ratio with its bootstrap interval
    assert 0 < s["overhead_cpu_fraction"] < 0.5 and s["overhead_ratio_paired"] > 0
    lo, hi = s["overhead_ratio_ci95"]
    assert lo <= s["overhead_ratio_paired"] <= hi
    cpu = body["overhead"]["cpu_runs"][0]
    assert cpu["ranks"] == 4 and cpu["agent_thread_s"] > 0 and cpu["recorder_s"] > 0 and cpu["master_s"] > 0
    crash = body["classes"][0]
    assert crash["runs"][0]["incident"]["ranks"] == [2] and crash["steps_lost"] is not None
    row = body["vs_torchft"][0]
    assert row["fault"] == "crash" and row["torchft_noticed_s"] is not None and row["torchft_noticed_s"] > 0
    # torchft finds a dead replica by its missing heartbeat and leaves it out of the next quorum
    assert row["torchft_dropped_from_quorum_s"] is not None
    assert "side by side with torchft" in r.stdout
