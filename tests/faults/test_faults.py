"""One test per fault class on a real 4-rank CPU job under `pliant train` (torchrun, gloo,
DeepSpeed ZeRO-1, the monitor's master beside it): the incident names the culprit, is
detected within the bound, and a job that restarts reaches its last step with parameters
equal to a fault-free run on the same data (deterministic CPU training: exactly equal).
No test waits for a process-group timeout: the monitor finds the fault in seconds."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from pliant.bench.fault_runs import DETECT_S, Job, command, environment
from pliant.bench.fault_runs import run_job as _run_job

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "faults-cpu.yaml"


def run_job(tmp_path, name, faults=(), overlay=None):
    return _run_job(tmp_path, name, CONFIG, list(faults), overlay)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]
LAST_STEP = 8


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Job:
    job = run_job(tmp_path_factory.mktemp("clean"), "run")
    assert job.rc == 0, job.tail()
    assert job.incidents == [], "a clean run raised alarms"
    return job


def assert_recovered(job: Job, clean: Job, bad_slots: set[int]) -> None:
    """Finished after one restart without the culprits' slots, with the fault-free parameters."""
    assert job.rc == 0, job.tail()
    sup = job.supervisor
    assert [a["outcome"] for a in sup["attempts"]] == ["incident", "finished"], sup
    assert set(map(int, sup["bad_slots"])) == bad_slots
    assert not bad_slots & set(sup["attempts"][1]["slots"])
    assert job.steps[-1] == LAST_STEP
    for attempt in (0, 1):  # rank 0's start-up marks of both starts, in order (pliant bench startup reads them)
        marks = json.loads((job.run_dir / f"startup-a{attempt}.json").read_text())
        order = [marks[k] for k in ("process", "imports", "trainer", "first_step")]
        assert order == sorted(order) and ("resumed" in marks) == (attempt == 1), marks
    assert torch.equal(job.params, clean.params), \
        f"max difference {(job.params - clean.params).abs().max().item():.3e}"


def test_crash_of_two_ranks_together(tmp_path, clean):
    """Two ranks crash in the same step: one incident names both, and the restart uses both
    spares. (A single crashed rank is localised and recovered in tests/faults/test_bench_faults.py
    and in the 2-node test, tests/faults/test_multinode.py.)"""
    job = run_job(tmp_path, "two", [{"kind": "crash", "rank": 1, "step": 5}, {"kind": "crash", "rank": 3, "step": 5}])
    inc = job.only_incident("crash")
    assert inc["ranks"] == [1, 3] and inc["action"] == "restart"
    assert job.latency(inc) < DETECT_S
    assert_recovered(job, clean, {1, 3})  # both spares used


def test_noncomm_hang(tmp_path, clean):
    """Rank 1 never enters the step's first collective; the others wait in it."""
    job = run_job(tmp_path, "hang", [{"kind": "hang_before_collective", "rank": 1, "step": 5, "collective": 0}])
    inc = job.only_incident("noncomm_hang")
    assert inc["ranks"] == [1]
    assert inc["evidence"]["not_entered"] == [1] and inc["evidence"]["entered"] == [0, 2, 3]
    culprit = inc["evidence"]["culprit_state"]["1"]  # the evidence that it makes no progress
    assert culprit["stuck_s"] >= 2.0 and any("faults.py" in f for f in culprit["stack"]), culprit
    assert any("faults.py" in line for line in inc["evidence"]["stack_outside"]["1"])
    assert job.latency(inc) < DETECT_S
    assert_recovered(job, clean, {1})


def test_comm_hang(tmp_path, clean):
    """Rank 1 enters its first collective of a 2-rank group at step 6 and it never completes:
    both ranks of the group are inside, so the link between them is named."""
    job = run_job(tmp_path, "comm", [{"kind": "hang_in_collective", "rank": 1, "step": 6, "group_size": 2}])
    inc = job.only_incident("comm_hang")
    assert 1 in inc["link"] and len(inc["link"]) == 2 and inc["ranks"] == inc["link"]
    assert sorted(inc["evidence"]["entered"]) == inc["link"]
    assert job.latency(inc) < DETECT_S
    assert_recovered(job, clean, set(inc["link"]))


@pytest.mark.parametrize("kind,state", [("sigstop", "stopped"), ("hold_gil", None)])
def test_frozen_rank(tmp_path, clean, kind, state):
    """A rank frozen by SIGSTOP, or stuck in C with the GIL held: alive, but silent."""
    job = run_job(tmp_path, kind, [{"kind": kind, "rank": 3, "step": 5}])
    inc = job.only_incident("noncomm_hang")
    assert inc["ranks"] == [3]
    ev = inc["evidence"]
    process = ev.get("process") or ev["culprit_state"]["3"]["process"]
    if state:
        assert process == state
    else:
        assert process not in ("stopped", "gone")  # alive, not stopped: the GIL
        outside = ev.get("main_thread_outside") or ev["culprit_state"]["3"]["main_thread_outside"]
        assert outside["no_progress_s"] >= 2.0, ev  # seen from outside: its main thread does nothing
        assert any("faults.py" in line for line in ev["stack_outside"]["3"]), ev  # py-spy, without its GIL
    assert job.latency(inc) < DETECT_S
    assert_recovered(job, clean, {3})


def test_straggler_reported_then_isolated(tmp_path, clean):
    # a short job: a window of 3 steps, and a noise chance allowed up to 0.1 (defaults: 6 and 1e-3)
    job = run_job(tmp_path, "slow", [{"kind": "slow", "rank": 2, "step": 2, "seconds": 0.4}],
                  overlay={"faults": {"straggler_window": 3, "straggler_p": 0.1, "isolate_after_s": 0.5}})
    kinds = [(i["kind"], i["ranks"], i["action"]) for i in job.incidents]
    assert ("straggler", [2], "report") in kinds and ("straggler", [2], "restart") in kinds, kinds
    assert {k for k, _, _ in kinds} == {"straggler"}, job.incidents
    assert_recovered(job, clean, {2})


def test_slow_link(tmp_path):
    """The LASP-1 ring sends states rank to rank: the 1 -> 2 cell of the latency matrix stands out."""
    job = run_job(tmp_path, "link", [{"kind": "slow_link", "rank": 1, "peer": 2, "step": 2, "seconds": 0.05}],
                  overlay={"model": {"linear_sp": "ring"}, "faults": {"isolate_after_s": None}})
    assert job.rc == 0, job.tail()
    inc = job.only_incident("slow_link")
    assert inc["link"] == [1, 2] and inc["action"] == "report"
    assert inc["evidence"]["cell_s"] > 5 * inc["evidence"]["typical_s"]


def test_nan_rollback(tmp_path, clean):
    job = run_job(tmp_path, "nan", [{"kind": "nan", "rank": 3, "step": 5}])
    inc = job.only_incident("nan")
    assert inc["ranks"] == [3] and inc["evidence"]["finite_inputs"] and 3 not in inc["evidence"]["finite_inputs"]
    assert job.latency(inc) < DETECT_S
    assert_recovered(job, clean, set())  # rolled back; a transient fault marks no slot bad


def test_nan_skip(tmp_path, clean):
    job = run_job(tmp_path, "skip", [{"kind": "nan", "rank": 0, "step": 5}], overlay={"faults": {"nan": "skip"}})
    assert job.rc == 0, job.tail()
    inc = job.only_incident("nan")
    assert inc["ranks"] == [0] and inc["action"] == "skip"
    assert "step 5: non-finite loss nan; the update was skipped" in job.out
    assert len(job.supervisor["attempts"]) == 1 and job.steps[-1] == LAST_STEP
    assert torch.isfinite(job.params).all()


def test_desync(tmp_path, clean):
    job = run_job(tmp_path, "desync", [{"kind": "desync", "rank": 1, "step": 5}])
    inc = job.only_incident("desync")
    assert inc["ranks"] == [1]
    sigs = inc["evidence"]["signatures"]
    others = {r: sig for r, sig in sigs.items() if r != "1"}  # those that had reported collective k
    assert sigs["1"][0] == "all_reduce" and others and {s[0] for s in others.values()} == {"broadcast_object_list"}
    assert job.latency(inc) < DETECT_S
    assert_recovered(job, clean, {1})


def test_death_during_checkpoint(tmp_path, clean):
    """Rank 2 dies after writing its part of the step-4 checkpoint: that checkpoint never
    completes, and the restart continues from step 2."""
    job = run_job(tmp_path, "ckpt", [{"kind": "die_in_checkpoint", "rank": 2, "step": 4}])
    inc = job.only_incident("crash")
    assert inc["ranks"] == [2]
    assert "resumed from step 2" in job.out
    assert_recovered(job, clean, {2})


def test_slow_checkpoint_is_no_alarm(tmp_path, clean):
    """A checkpoint write far longer than any hang threshold (6 s): no alarm."""
    job = run_job(tmp_path, "slowckpt", [{"kind": "slow_checkpoint", "rank": 0, "step": 4, "seconds": 6.0}])
    assert job.rc == 0, job.tail()
    assert job.incidents == []
    assert job.fired and len(job.supervisor["attempts"]) == 1
    assert torch.equal(job.params, clean.params)


def test_master_error(tmp_path, clean):
    """The master (a thread of the supervisor) fails early: the job finishes unmonitored, saying
    so; it never hangs, and the ranks' agents give the master up after master_timeout_s."""
    run_dir = tmp_path / "nomaster"
    fault = [{"kind": "master_error", "rank": 0, "step": 2}]
    proc = subprocess.run(command(run_dir, CONFIG, {"faults": {"master_timeout_s": 2.0}}), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=environment(fault), timeout=300)
    job = Job(proc.returncode, proc.stdout, run_dir)
    assert job.rc == 0, job.tail()
    assert "the fault monitor master stopped (RuntimeError: injected master error at step" in job.out
    assert "training goes on unmonitored" in job.out
    assert job.steps[-1] == LAST_STEP and torch.equal(job.params, clean.params)


def test_no_spare_slot_restarts_with_a_smaller_world(tmp_path, clean):
    """No spare slot: the restart runs on the 3 healthy slots, loads the 4-rank ZeRO
    checkpoint through DeepSpeed's universal form and the planner plans for 3 ranks. The
    reductions add in another order, so the parameters equal the fault-free run's to
    rounding, not bit for bit."""
    # memory for the longest sequence (160 tokens) in a group of 3
    job = run_job(tmp_path, "shrink", [{"kind": "crash", "rank": 1, "step": 5}],
                  overlay={"cluster": {"spare_devices_per_node": 0, "device_memory_gib": 0.0016}})
    assert job.rc == 0, job.tail()
    assert job.only_incident("crash")["ranks"] == [1]
    sup = job.supervisor
    assert [(a["outcome"], a["world"], a["slots"]) for a in sup["attempts"]] == [
        ("incident", 4, [0, 1, 2, 3]), ("finished", 3, [0, 2, 3])], sup
    assert "checkpoint step-00000004 was written by 4 ranks; loading it into 3 through DeepSpeed's universal" \
        in job.out
    assert job.steps[-1] == LAST_STEP
    resumed = [m for m in job.metrics if m["wall"] >= sup["attempts"][1]["started"]]
    assert [m["step"] for m in resumed] == [5, 6, 7, 8]
    # the first loss after the restart is the fault-free run's (the parameters loaded whole: a
    # wrong or partial load moves it by far more than 1e-3), to the rounding of another plan: 3
    # ranks group the sequences differently from 4, and ZeRO's fp32 master weights the universal
    # checkpoint holds round the fp64 parameters (measured: 2.3e-9 relative); the parameters stay
    # within 1e-6 of the fault-free run's, while a lost optimizer state would be off by ~lr (2e-3)
    clean_loss = {m["step"]: m["loss"] for m in clean.metrics}
    assert abs(resumed[0]["loss"] - clean_loss[5]) < 1e-7 * abs(clean_loss[5])
    torch.testing.assert_close(job.params, clean.params, rtol=0, atol=1e-6)


def test_no_spare_slot_and_no_shrink_stops_with_a_clear_message(tmp_path):
    job = run_job(tmp_path, "nospare", [{"kind": "crash", "rank": 0, "step": 3}],
                  overlay={"cluster": {"spare_devices_per_node": 0}, "faults": {"shrink": False}})
    assert job.rc != 0
    assert job.only_incident("crash")["ranks"] == [0]
    assert "pliant: giving up: 3 healthy slot(s) left for a world of 4" in job.out
    assert "faults.shrink is off" in job.out
    assert len(job.supervisor["attempts"]) == 1


def test_smaller_world_that_cannot_hold_the_longest_sequence_stops(tmp_path):
    job = run_job(tmp_path, "toosmall", [{"kind": "crash", "rank": 0, "step": 3}],
                  overlay={"cluster": {"spare_devices_per_node": 0}})
    assert job.rc != 0
    assert "no spare slot left and a world of 3 holds sequences of at most" in job.out
    assert "train.max_len is 160" in job.out
    assert len(job.supervisor["attempts"]) == 1
    # the reason is composed before the job was stopped, and written into the incident
    assert "train.max_len is 160" in job.only_incident("crash")["restart"]["error"]


def test_default_config_restarts_on_three_ranks(tmp_path):
    """configs/local-cpu.yaml as it ships (no spare slot; bandwidth tables with entries for
    groups of 2 and 4) takes a crash: the 3-rank restart's tables replace the base's (merged
    key by key they kept the size-4 entry, and every such restart died on a config error),
    the restart is composed before the job is stopped, and the job finishes on 3 ranks."""
    default = Path(__file__).resolve().parents[2] / "configs" / "local-cpu.yaml"
    job = _run_job(tmp_path, "default", default, [{"kind": "crash", "rank": 2, "step": 3}],
                   {"train": {"steps": 5, "checkpoint_every": 2}})
    assert job.rc == 0, job.tail()
    inc = job.only_incident("crash")
    assert inc["ranks"] == [2] and inc["restart"]["world"] == 3 and inc["restart"]["slots"] == [0, 1, 3]
    sup = job.supervisor
    assert [(a["outcome"], a["world"]) for a in sup["attempts"]] == [("incident", 4), ("finished", 3)], sup
    assert job.steps[-1] == 5
