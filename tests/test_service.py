"""Planning step i+1 in a background process while step i runs."""
from __future__ import annotations

import os
from concurrent.futures import Future

import pytest

from pliant.planner import PlanningService, SequenceTooLongError, validate_plan

from conftest import REPO

from conftest import small_planner


def test_plans_come_back_as_futures_from_another_process():
    planner = small_planner(2, 4, time_limit_s=0.5)
    batches = [[6000, 300, 200, 2500], [100, 200, 300], [7000, 7000, 50]]
    with PlanningService(planner) as service:
        futures = [service.submit(b) for b in batches]
        assert all(isinstance(f, Future) for f in futures)
        plans = [f.result(timeout=60) for f in futures]
        pid = service._pool.submit(os.getpid).result(timeout=60)
    assert pid != os.getpid()
    for b, plan in zip(batches, plans):
        assert plan.lengths == b
        validate_plan(plan, planner.cost, planner.sizes)


def test_errors_travel_back_through_the_future():
    planner = small_planner(2, 4, memory_gib=0.25, time_limit_s=0.5)
    with PlanningService(planner) as service:
        fut = service.submit([10**9])
        with pytest.raises(SequenceTooLongError, match="longest sequence this cluster can hold") as e:
            fut.result(timeout=60)
        assert e.value.length == 10**9
        # the service survives a failed plan
        assert service.submit([100, 200]).result(timeout=60).lengths == [100, 200]


def test_the_planning_process_dies_with_its_parent(tmp_path):
    """A rank that crashes must not leave its planner running (it would hold the job's pipes)."""
    import signal
    import subprocess
    import sys
    import time

    code = (
        "import sys, os; sys.path.insert(0, %r)\n"
        "from conftest import small_planner\n"
        "from pliant.planner import PlanningService\n"
        "s = PlanningService(small_planner(2, 4, time_limit_s=0.3))\n"
        "s.submit([100, 200]).result(timeout=60)\n"
        "print('planner pids', *s._pool._processes, flush=True)\n"
        "os._exit(3)\n"  # die without closing the service
    ) % str(REPO / "tests")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("planner pids"))  # a solver may print too
    pids = [int(x) for x in line.split()[2:]]
    assert pids
    deadline = time.time() + 10
    alive = pids
    while alive and time.time() < deadline:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"planner processes {alive} outlived their parent"
