"""The RL learner under the fault monitor (docs/faults.md, "The RL learner"): a crash, a hang
before a collective and a SIGSTOP on rank 1 of a 2-rank learner are each named with the rank
and its evidence within 10 s, the learner group is restarted from its last checkpoint (a new
generation), and the run reaches its last step with every prompt group trained exactly once
and no sample more than k versions stale. The rollout, reward and reference workers and the
queue are kept. (The job: pliant/bench/rl_fault_runs.py, also run by `pliant bench faults --rl`.)"""
from __future__ import annotations

from pathlib import Path

import pytest

from pliant.bench.rl_fault_runs import FAULT_RANK, FAULT_STEP, RL_CLASSES, STALENESS, STEPS, run_rl_job

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "rl-local.yaml"
# the evidence that names the culprit: its process gone; the collective it never entered; its process stopped
EVIDENCE = {"crash": ("processes",), "noncomm_hang": ("not_entered",), "sigstop": ("process", "culprit_state")}


@pytest.mark.parametrize("name", list(RL_CLASSES))
def test_a_failed_learner_rank_is_named_and_the_learner_restarted(tmp_path, name):
    kind, named_as = RL_CLASSES[name]
    job = run_rl_job(tmp_path, "run", CONFIG, kind)
    assert job.rc == 0, job.tail()
    inc = job.restart_incident()
    assert inc is not None and inc["kind"] == named_as and inc["ranks"] == [FAULT_RANK], job.incidents
    assert any(key in inc["evidence"] for key in EVIDENCE[name]), inc["evidence"]
    assert job.latency(inc) < 10.0, (job.latency(inc), inc)
    assert f"the fault monitor named learner rank(s) [{FAULT_RANK}]" in job.out
    assert job.summary["learner_restarts"] == 1
    assert 0 < job.restarted_from() <= FAULT_STEP  # from its checkpoint, not from the start
    assert [x["step"] for x in job.rows] == list(range(STEPS))
    assert job.groups_once()  # none lost, none twice
    assert job.max_staleness() <= STALENESS
    assert not [i for i in job.incidents if i["attempt"] == 1]  # the restarted generation ran clean
