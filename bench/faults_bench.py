"""`pliant bench faults`: every fault class injected into a real supervised job, repeated.

Per class: detection latency (median over repeats, from the injector's record of the moment
the fault struck to the master's incident), whether the culprit was named correctly, time
from the fault to the first step trained after the restart, and steps of work lost. Then
the instrumentation overhead (median step time with the monitor on / off, runs interleaved)
and false alarms over clean steps with injected compute jitter of +-50% on every rank.
Last, torchft side by side (torchft_compare): how long a torchft job takes to notice a
crashed and a hung replica, and whether it names the culprit, beside pliant's crash and
non-communication hang classes.

With `--stress N`, a busy machine (bench/stress.py): N CPU-burning processes beside the job
and one process writing and fsyncing a few MB in a loop into the job's run directory. Clean
jobs under that load must not restart (a slow rank is not a hung one), and an injected
non-communication hang must still be found and named (its latency is reported).
"""
from __future__ import annotations

import math
import os
import statistics
import tempfile
from pathlib import Path

from . import torchft_compare
from .fault_runs import DETECT_S, Job, run_job
from .stress import stress

from pliant.io import strict_dumps

# class -> (faults, config overlay, expected incident kind, expected culprit ranks or link)
CLASSES: dict[str, tuple[list[dict], dict, str, list[int]]] = {
    "crash": ([{"kind": "crash", "rank": 2, "step": 5}], {}, "crash", [2]),
    "comm_hang": ([{"kind": "hang_in_collective", "rank": 1, "step": 6, "group_size": 2}], {}, "comm_hang", [1]),
    "noncomm_hang": ([{"kind": "hang_before_collective", "rank": 1, "step": 5}], {}, "noncomm_hang", [1]),
    "sigstop": ([{"kind": "sigstop", "rank": 3, "step": 5}], {}, "noncomm_hang", [3]),
    "hold_gil": ([{"kind": "hold_gil", "rank": 0, "step": 5}], {}, "noncomm_hang", [0]),
    # a short job: a window of 3 steps, and a noise chance allowed up to 0.1 (defaults: 6 and 1e-3)
    "straggler": ([{"kind": "slow", "rank": 2, "step": 2, "seconds": 0.4}],
                  {"faults": {"straggler_window": 3, "straggler_p": 0.1, "isolate_after_s": 0.5}}, "straggler", [2]),
    "slow_link": ([{"kind": "slow_link", "rank": 1, "peer": 2, "step": 2, "seconds": 0.05}],
                  {"model": {"linear_sp": "ring"}, "faults": {"isolate_after_s": None}}, "slow_link", [1, 2]),
    "nan": ([{"kind": "nan", "rank": 3, "step": 5}], {}, "nan", [3]),
    "desync": ([{"kind": "desync", "rank": 1, "step": 5}], {}, "desync", [1]),
}
HANG_CRASH = ("crash", "comm_hang", "noncomm_hang", "sigstop", "hold_gil")
VS_TORCHFT = {"crash": "crash", "hang": "noncomm_hang"}  # torchft fault -> the pliant class it compares with
STRESS_HANG = "noncomm_hang"  # the class injected under stress
STRESS_WARMUP_S = 3.0  # the burners run this long before the job starts: it starts on a busy machine
STRESS_TIMEOUT_S = 1500.0  # one job under stress (a clean one takes ~30 s on a quiet 2-core machine)
# the summary's stress keys, all null without a stress phase
STRESS_KEYS = ("false_restarts_under_stress", "stress_clean_finished", "stress_hang_detection_s",
               "stress_hang_localised", "stress_hang_recovered", "stress_cpu_burners", "stress_disk_hammer",
               "stress_repeats", "stress_load1_median", "stress_load1_max", "stress_runnable_median")


def localised(job: Job, kind: str, culprit: list[int]) -> tuple[dict | None, bool]:
    """The first incident of the expected kind, and whether it names the culprit (for a
    communication hang: the link, which must contain the faulty rank)."""
    found = [i for i in job.incidents if i["kind"] == kind]
    if not found:
        return None, False
    inc = found[0]
    if kind == "comm_hang":
        return inc, bool(inc["link"]) and set(culprit) <= set(inc["link"])
    if kind == "slow_link":
        return inc, inc["link"] == culprit
    return inc, inc["ranks"] == culprit


def measure_class(name: str, repeats: int, config: Path, work: Path) -> dict:
    faults, overlay, kind, culprit = CLASSES[name]
    runs = []
    for i in range(repeats):
        job = run_job(work, f"{name}-{i}", config, faults, overlay)
        inc, ok = localised(job, kind, culprit)
        resumed_s, lost = job.recovery()
        runs.append({"rc": job.rc, "localised": ok, "incident": inc and {k: inc[k] for k in ("kind", "ranks", "link",
                                                                                              "action", "step")},
                     "detection_s": job.latency(inc) if inc else None, "resumed_s": resumed_s, "steps_lost": lost,
                     "other_incidents": [(j["kind"], j["ranks"]) for j in job.incidents if j["kind"] != kind]})
        print(f"  {name} #{i}: localised {ok}, detected in "
              f"{runs[-1]['detection_s'] if inc else float('nan'):.2f} s, resumed after {resumed_s} s", flush=True)

    def med(key):
        vals = [r[key] for r in runs if r[key] is not None]
        return statistics.median(vals) if vals else None

    return {"class": name, "expected": {"kind": kind, "culprit": culprit}, "runs": runs,
            "localised": all(r["localised"] for r in runs), "detection_s": med("detection_s"),
            "resumed_s": med("resumed_s"), "steps_lost": med("steps_lost")}


def step_seconds(job: Job, skip: int) -> list[float]:
    return [m["seconds"] for m in job.metrics[skip:]]


OVERHEAD_PAIRS = 16  # monitor off/on run pairs by default: fewer cannot tell a 3% cost from none here


def bootstrap_ci(ratios: list[float], n: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the geometric mean of `ratios` (pairs resampled)."""
    import numpy as np

    logs = np.log(np.asarray(ratios, dtype=np.float64))
    idx = np.random.default_rng(seed).integers(0, len(logs), size=(n, len(logs)))
    means = np.exp(logs[idx].mean(axis=1))
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


RANK_COSTS = ("agent_thread_s", "zmq_threads_s", "recorder_s")  # what each rank's goodbye reports monitoring cost it


def monitor_cpu(job: Job) -> dict:
    """What monitoring cost the job's ranks and master, CPU seconds, from the master's summary
    (each rank's agent reports its own costs in its goodbye: monitor/master-a0.json)."""
    import json

    body = json.loads((job.run_dir / "monitor" / "master-a0.json").read_text())
    costs = [r["cost"] for r in body["ranks"].values() if r.get("cost")]
    if not costs:
        raise RuntimeError(f"{job.run_dir}: no rank reported what monitoring cost it (monitor/master-a0.json)")
    out = {k: sum(c[k] for c in costs) for k in (*RANK_COSTS, "process_s")}
    out["master_s"] = body["cpu_s"]
    out["ranks"] = len(costs)
    # collectives the ranks completed and reported (a collective of g members counts g times)
    out["collectives"] = sum(n * len(g.split(",")) for g, n in body.get("collectives", {}).items())
    out["monitor_s"] = sum(out[k] for k in RANK_COSTS) + out["master_s"]
    return out


def measure_overhead(config: Path, work: Path, repeats: int, steps: int, skip: int = 3) -> dict:
    """The monitor's cost, two ways.

    * CPU: each rank's agent thread, ZeroMQ's I/O threads and the recorder's own time in every
      wrapped collective, read by the rank itself, plus the master process's CPU, as a fraction
      of the ranks' whole CPU time (and per step).
    * Step time: `repeats` pairs of runs, monitor off and on, the same batches, their order
      alternating (off-on, on-off, ...) so that drift cancels. A pair's ratio is the median over
      steps of step i on / step i off; the estimate is the geometric mean of the pairs' ratios
      with a 95% bootstrap interval over pairs (on 2 shared cores a run's median moves by
      +-15%, so the interval, not one ratio, says whether a cost is there). The first `skip`
      steps, which build process groups, are left out."""
    pairs, pooled_on, pooled_off, cpu = [], [], [], []
    for i in range(repeats):
        times = {}
        for enabled in ((False, True) if i % 2 == 0 else (True, False)):
            job = run_job(work, f"overhead-{'on' if enabled else 'off'}-{i}", config,
                          overlay={"faults": {"enabled": enabled}, "train": {"steps": steps, "checkpoint_every": steps}})
            if job.rc != 0:
                raise RuntimeError(f"overhead run failed:\n{job.tail()}")
            times[enabled] = step_seconds(job, skip)
            if enabled:
                cpu.append(monitor_cpu(job))
        pooled_off += times[False]
        pooled_on += times[True]
        pairs.append(statistics.median(a / b for a, b in zip(times[True], times[False])))
        print(f"  pair {i + 1}/{repeats}: step ratio on/off {pairs[-1]:.4f}; monitor CPU "
              f"{cpu[-1]['monitor_s'] / cpu[-1]['process_s']:.4%} of the ranks'", flush=True)
    lo, hi = bootstrap_ci(pairs)
    total = {k: sum(c[k] for c in cpu) for k in (*RANK_COSTS, "master_s", "monitor_s", "process_s")}
    run_steps = steps * len(cpu)
    return {"pairs": repeats, "pair_ratios": [round(r, 5) for r in pairs],
            "paired_ratio": math.exp(sum(math.log(r) for r in pairs) / len(pairs)), "ci95": [lo, hi],
            "median_off": statistics.median(pooled_off), "median_on": statistics.median(pooled_on),
            "overhead_ratio": statistics.median(pooled_on) / statistics.median(pooled_off),
            "cpu_fraction": total["monitor_s"] / total["process_s"],
            "cpu_s_per_step": {k: round(v / run_steps, 6) for k, v in total.items()},
            "recorder_us_per_collective": round(1e6 * total["recorder_s"] / max(1, sum(c["collectives"] for c in cpu)), 2),
            "collectives_per_rank_step": round(sum(c["collectives"] for c in cpu) / max(1, sum(c["ranks"] for c in cpu))
                                               / steps, 1),
            "cpu_runs": cpu}


def measure_false_alarms(config: Path, work: Path, steps: int, compute_s: float) -> dict:
    """Clean steps with every rank's compute stretched by uniform(0, 2c) per step: with c
    the measured compute time, a step's compute ranges over [c, 3c], +-50% around its mean."""
    from pliant.config import load_config

    world = load_config(config).cluster.world_size
    jitter = [{"kind": "jitter", "rank": r, "step": 1, "seconds": 2 * compute_s} for r in range(world)]
    job = run_job(work, "jitter", config, jitter, {"train": {"steps": steps, "checkpoint_every": max(2, steps // 4)}})
    return {"steps": steps, "jitter_s": 2 * compute_s, "rc": job.rc, "steps_done": len(job.metrics),
            "false_alarms": len(job.incidents), "incidents": [(i["kind"], i["ranks"]) for i in job.incidents]}


def run_stressed(work: Path, name: str, config: Path, n_cpu: int, disk: bool, faults: list[dict] = (),
                 overlay: dict | None = None) -> tuple[Job, dict]:
    """One supervised job beside `n_cpu` CPU burners and, with `disk`, a disk hammer writing
    into the job's own run directory (made before the job starts; `pliant train` takes an
    existing one). Returns the job and the stress record (load average while it ran)."""
    run_dir = work / name
    run_dir.mkdir(parents=True, exist_ok=True)
    with stress(n_cpu, run_dir if disk else None, warmup_s=STRESS_WARMUP_S) as info:
        job = run_job(work, name, config, faults, overlay, timeout=STRESS_TIMEOUT_S)
    record = info.summary()
    if record["survivors"]:
        print(f"  warning: stress processes still alive after the stop: {record['survivors']}", flush=True)
    return job, {**record, "load1": [round(x, 2) for x in info.load1], "runnable": info.runnable}


def restarts(job: Job) -> tuple[int, list[dict]]:
    """Restarts of a job: supervisor starts beyond the first, or incidents that asked for a
    restart if more (the last one may have been refused: budget spent); and those incidents."""
    fatal = [i for i in job.incidents if i["action"] == "restart"]
    return max(len(job.supervisor["attempts"]) - 1, len(fatal)), fatal


def measure_stress(config: Path, work: Path, n_cpu: int, repeats: int, disk: bool = True) -> dict:
    """`repeats` clean jobs and one with an injected non-communication hang, each beside
    `n_cpu` CPU burners and (with `disk`) a disk hammer in its run directory."""
    print(f"busy machine: {n_cpu} CPU burners on {os.cpu_count()} cores"
          f"{' and a disk hammer in the run directory' if disk else ''} (run directories under {work})", flush=True)
    clean, loads = [], []
    for i in range(repeats):
        job, load = run_stressed(work, f"stress-clean-{i}", config, n_cpu, disk)
        n, fatal = restarts(job)
        clean.append({"rc": job.rc, "steps_done": len(job.metrics), "attempts": len(job.supervisor["attempts"]),
                      "restarts": n, "incidents": [(j["kind"], j["ranks"], j["action"]) for j in job.incidents],
                      "restart_incidents": fatal, "run_dir": str(job.run_dir), "load": load})
        loads.append(load)
        print(f"  clean #{i}: rc {job.rc}, {len(job.metrics)} steps, {n} restart(s), incidents "
              f"{clean[-1]['incidents'] or 'none'}; load1 median {load['load1_median']} max {load['load1_max']}",
              flush=True)
    faults, overlay, kind, culprit = CLASSES[STRESS_HANG]
    job, load = run_stressed(work, "stress-hang", config, n_cpu, disk, faults, overlay)
    loads.append(load)
    inc, ok = localised(job, kind, culprit)
    resumed_s, lost = job.recovery()
    outcome = job.supervisor["attempts"][-1]["outcome"]
    hang = {"class": STRESS_HANG, "expected": {"kind": kind, "culprit": culprit}, "rc": job.rc, "localised": ok,
            "incident": inc and {k: inc[k] for k in ("kind", "ranks", "link", "action", "step", "evidence")},
            "detection_s": job.latency(inc) if inc else None, "recovered": job.rc == 0 and outcome == "finished",
            "resumed_s": resumed_s, "steps_lost": lost, "steps_done": len(job.metrics),
            "other_incidents": [(j["kind"], j["ranks"], j["action"]) for j in job.incidents if j != inc],
            "run_dir": str(job.run_dir), "load": load}
    print(f"  {STRESS_HANG} under stress: localised {ok}, detected in "
          f"{hang['detection_s'] if inc else float('nan'):.2f} s, recovered {hang['recovered']}; load1 median "
          f"{load['load1_median']} max {load['load1_max']}", flush=True)
    pooled1 = [x for r in loads for x in r["load1"]]
    pooled_r = [x for r in loads for x in r["runnable"]]
    return {"cpu_burners": n_cpu, "disk_hammer": disk, "cores": os.cpu_count(), "repeats": repeats,
            "warmup_s": STRESS_WARMUP_S, "clean_runs": clean, "hang_run": hang,
            "false_restarts": sum(r["restarts"] for r in clean),
            "clean_finished": sum(r["rc"] == 0 for r in clean),
            "load1_median": round(statistics.median(pooled1), 2) if pooled1 else None,
            "load1_max": round(max(pooled1), 2) if pooled1 else None,
            "runnable_median": statistics.median(pooled_r) if pooled_r else None}


def stress_summary(st: dict | None) -> dict:
    if st is None:
        return dict.fromkeys(STRESS_KEYS)
    hang = st["hang_run"]
    return {"false_restarts_under_stress": st["false_restarts"], "stress_clean_finished": st["clean_finished"],
            "stress_hang_detection_s": None if hang["detection_s"] is None else round(hang["detection_s"], 3),
            "stress_hang_localised": hang["localised"], "stress_hang_recovered": hang["recovered"],
            "stress_cpu_burners": st["cpu_burners"], "stress_disk_hammer": st["disk_hammer"],
            "stress_repeats": st["repeats"], "stress_load1_median": st["load1_median"],
            "stress_load1_max": st["load1_max"], "stress_runnable_median": st["runnable_median"]}


# a real 2-node job (bench/netns.py: two network namespaces): class -> (faults, overlay, node-1 kill step,
# expected kind, expected culprit ranks); ranks 0, 1 run on node 0 and 2, 3 on node 1
MULTINODE: dict[str, tuple[list[dict], dict | None, int | None, str, list[int]]] = {
    "crash": ([{"kind": "crash", "rank": 3, "step": 5}], None, None, "crash", [3]),
    "noncomm_hang": ([{"kind": "hang_before_collective", "rank": 2, "step": 5}], None, None, "noncomm_hang", [2]),
    "nan": ([{"kind": "nan", "rank": 3, "step": 5}], None, None, "nan", [3]),
    # every process of node 1 killed; node 0 goes on alone (more memory: a world of 2 holds the longest sequence)
    "node_lost": ([], {"cluster": {"device_memory_gib": 0.005}}, 4, "node_lost", [2, 3]),
}


def measure_multinode(config: Path, work: Path) -> dict:
    """Each MULTINODE class on a real 2-node job (2 ranks and a spare slot per node): named
    with its node, detected, recovered; a rank's fault ends with the fault-free parameters."""
    from .fault_runs import run_two_node_job
    from .netns import netns_available, two_node_network

    reason = netns_available()
    if reason:
        raise RuntimeError(f"the 2-node phase needs network namespaces: {reason}")
    port = iter(range(29400, 29400 + 10 * (len(MULTINODE) + 1), 10))
    rows = []
    with two_node_network() as nodes:
        clean = run_two_node_job(work, "multinode-clean", config, nodes, port=next(port))
        print(f"  clean 2-node run: rc {clean.rc}, {len(clean.steps)} steps, incidents {len(clean.incidents)}",
              flush=True)
        for name, (faults, overlay, kill, kind, culprit) in MULTINODE.items():
            job = run_two_node_job(work, f"multinode-{name}", config, nodes, faults, overlay, port=next(port),
                                   kill_node_at_step=kill)
            found = [i for i in job.incidents if i["kind"] == kind]
            inc = found[0] if found else None
            ok = inc is not None and inc["ranks"] == culprit and set(inc["nodes"]) == {1}
            same = None if kill is not None or job.rc != 0 or clean.rc != 0 else \
                bool((job.params == clean.params).all())
            rows.append({"class": name, "kind": kind, "localised": ok, "nodes": inc and inc["nodes"],
                         "exclude_nodes": inc and inc["exclude_nodes"],
                         "detection_s": inc and (inc["detection_s"] if kill is not None else job.latency(inc)),
                         "recovered": job.rc == 0 and bool(job.steps) and job.steps[-1] == clean.steps[-1],
                         "restart": inc and inc.get("restart"), "params_equal_fault_free": same,
                         "other_incidents": [(j["kind"], j["ranks"]) for j in job.incidents if j is not inc]})
            r = rows[-1]
            print(f"  {name} on node 1: named {ok} (nodes {r['nodes']}), detected in "
                  f"{r['detection_s'] if r['detection_s'] is not None else float('nan'):.2f} s, recovered "
                  f"{r['recovered']}, fault-free parameters {same}", flush=True)
    return {"clean_rc": clean.rc, "clean_steps": len(clean.steps), "classes": rows}


def measure_rl(config: Path, work: Path, repeats: int) -> dict:
    """Each RL_CLASSES fault on a learner rank of `pliant rl` (bench/rl_fault_runs.py): named
    with its rank, detected, the learner group restarted from its checkpoint, every prompt group
    trained once, staleness within k; and the run's wall time beside a clean run's."""
    import time

    from .rl_fault_runs import FAULT_STEP, RL_CLASSES, STALENESS, run_rl_job

    def timed(name: str, kind: str | None):
        t0 = time.monotonic()
        job = run_rl_job(work, name, config, kind)
        return job, time.monotonic() - t0

    clean, clean_s = timed("rl-clean", None)
    if clean.rc != 0:
        raise RuntimeError(f"the clean RL run failed:\n{clean.tail()}")
    print(f"  clean RL run: {clean_s:.1f} s, incidents {len(clean.incidents)}", flush=True)
    rows = []
    for name, (kind, named_as) in RL_CLASSES.items():
        runs = []
        for i in range(repeats):
            job, wall = timed(f"rl-{name}-{i}", kind)
            inc = job.restart_incident()
            ok = inc is not None and inc["kind"] == named_as and inc["ranks"] == [1]
            start = job.restarted_from()
            recovered = (job.rc == 0 and job.summary.get("learner_restarts") == 1 and job.groups_once()
                         and (job.max_staleness() or 0) <= STALENESS)
            runs.append({"rc": job.rc, "localised": ok, "incident": inc and {k: inc[k] for k in ("kind", "ranks",
                                                                                                   "action", "step")},
                         "evidence": inc and sorted(inc["evidence"]),
                         "detection_s": job.latency(inc) if inc else None, "restarted_from_step": start,
                         "steps_trained_again": None if start is None else FAULT_STEP - start,
                         "recovered": recovered, "groups_once": job.groups_once(),
                         "max_staleness": job.max_staleness(), "run_s": wall, "extra_s": wall - clean_s,
                         "other_incidents": [(j["kind"], j["ranks"], j["attempt"]) for j in job.incidents
                                             if j is not inc and j != inc]})
            r = runs[-1]
            print(f"  {name} #{i}: named {ok}, detected in "
                  f"{r['detection_s'] if inc else float('nan'):.2f} s, restarted from step {start}, recovered "
                  f"{recovered}, run {wall:.1f} s ({wall - clean_s:+.1f} s)", flush=True)
        det = [r["detection_s"] for r in runs if r["detection_s"] is not None]
        rows.append({"class": name, "injected": kind, "kind": named_as, "runs": runs,
                     "localised": all(r["localised"] for r in runs), "recovered": all(r["recovered"] for r in runs),
                     "detection_s": statistics.median(det) if det else None,
                     "extra_s": statistics.median(r["extra_s"] for r in runs)})
    return {"config": str(config), "clean_run_s": clean_s, "clean_incidents": len(clean.incidents),
            "classes": rows}


def side_by_side(results: list[dict], torchft: dict) -> list[dict]:
    rows = []
    for fault, ours in VS_TORCHFT.items():
        mine = next((r for r in results if r["class"] == ours), None)
        theirs = torchft.get(fault)
        if mine is None or theirs is None:
            continue
        rows.append({"fault": fault, "pliant_class": ours, "pliant_detection_s": mine["detection_s"],
                     "pliant_names_culprit": mine["localised"], "torchft_noticed_s": theirs["noticed_s"],
                     "torchft_names_culprit": theirs["names_culprit"],
                     "torchft_dropped_from_quorum_s": theirs["dropped_from_quorum_s"],
                     "speedup": (theirs["noticed_s"] / mine["detection_s"]) if theirs["noticed_s"] and
                     mine["detection_s"] else None})
    return rows


def run(config: Path, out: Path, repeats: int, classes: list[str], overhead_steps: int, jitter_steps: int,
        torchft_repeats: int = 0, torchft_faults: tuple[str, ...] = torchft_compare.FAULTS,
        overhead_repeats: int | None = None, stress_cpu: int = 0, stress_repeats: int = 1,
        stress_only: bool = False, stress_disk: bool = True, multinode: bool = False,
        multinode_only: bool = False, rl_config: Path | None = None, rl_only: bool = False) -> dict:
    """The whole bench. `stress_cpu` > 0 adds the busy-machine phase, `multinode` the 2-node
    phase, `rl_config` the RL learner phase; `stress_only` / `multinode_only` / `rl_only` run
    those phases alone (the other figures' keys are then null)."""
    work = Path(tempfile.mkdtemp(prefix="pliant-bench-faults-"))
    results, overhead, alarms, torchft = [], None, None, {}
    if not (stress_only or multinode_only or rl_only):
        for name in classes:
            print(f"class {name}", flush=True)
            results.append(measure_class(name, repeats, config, work))
        print("instrumentation overhead", flush=True)
        overhead = measure_overhead(config, work, overhead_repeats or OVERHEAD_PAIRS, overhead_steps)
        print(f"  median step {overhead['median_off']:.4f} s off, {overhead['median_on']:.4f} s on: ratio "
              f"{overhead['overhead_ratio']:.4f}; paired {overhead['paired_ratio']:.4f} (95% CI "
              f"{overhead['ci95'][0]:.4f}-{overhead['ci95'][1]:.4f}); monitor CPU {overhead['cpu_fraction']:.3%}",
              flush=True)
        print("false alarms under jitter", flush=True)
        alarms = measure_false_alarms(config, work, jitter_steps, overhead["median_off"])
        if torchft_repeats:
            print("torchft side by side", flush=True)
            torchft = torchft_compare.measure(work, torchft_repeats, torchft_faults)
    busy = measure_stress(config, work, stress_cpu, stress_repeats, stress_disk) if stress_cpu > 0 else None
    nodes = None
    if multinode or multinode_only:
        print("2-node job (network namespaces)", flush=True)
        nodes = measure_multinode(config, work)
    learner = None
    if rl_config is not None:
        print("the RL learner (pliant rl, a 2-rank learner)", flush=True)
        learner = measure_rl(rl_config, work, repeats)
    hang_crash = [r["detection_s"] for r in results if r["class"] in HANG_CRASH and r["detection_s"] is not None]
    summary = {
        "classes": len(results),
        "all_localised": all(r["localised"] for r in results),
        "max_detection_s_hang_crash": max(hang_crash) if hang_crash else None,
        "detection_bound_s": DETECT_S,
        "overhead_ratio": round(overhead["overhead_ratio"], 4) if overhead else None,
        "overhead_ratio_paired": round(overhead["paired_ratio"], 4) if overhead else None,
        "overhead_ratio_ci95": [round(x, 4) for x in overhead["ci95"]] if overhead else None,
        "overhead_cpu_fraction": round(overhead["cpu_fraction"], 5) if overhead else None,
        "false_alarms": alarms["false_alarms"] if alarms else None,
        "repeats": repeats,
        **stress_summary(busy),
        "multinode_classes": len(nodes["classes"]) if nodes else None,
        "multinode_all_localised": all(r["localised"] for r in nodes["classes"]) if nodes else None,
        "multinode_all_recovered": all(r["recovered"] for r in nodes["classes"]) if nodes else None,
        "rl_classes": len(learner["classes"]) if learner else None,
        "rl_all_localised": all(r["localised"] for r in learner["classes"]) if learner else None,
        "rl_all_recovered": all(r["recovered"] for r in learner["classes"]) if learner else None,
        "rl_max_detection_s": max((r["detection_s"] for r in learner["classes"] if r["detection_s"] is not None),
                                  default=None) if learner else None,
    }
    body = {"config": str(config), "summary": summary, "classes": results, "overhead": overhead,
            "false_alarm_run": alarms, "torchft": torchft, "vs_torchft": side_by_side(results, torchft),
            "stress": busy, "multinode": nodes, "rl": learner}
    out.write_text(strict_dumps(body, indent=1))
    print_table(body)
    return body


def print_table(body: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    if body["classes"]:
        t = Table(title="fault classes (medians over repeats)")
        for col in ("class", "localised", "detect s", "resumed s", "steps lost"):
            t.add_column(col)
        for r in body["classes"]:
            t.add_row(r["class"], str(r["localised"]), fmt(r["detection_s"]), fmt(r["resumed_s"]),
                      "-" if r["steps_lost"] is None else str(r["steps_lost"]))
        Console().print(t)
    s = body["summary"]
    if body["overhead"] is not None:
        print(f"monitor CPU: {s['overhead_cpu_fraction']:.3%} of the ranks'; step time on / off: paired "
              f"{s['overhead_ratio_paired']:.3f} (95% CI {s['overhead_ratio_ci95'][0]:.3f}-"
              f"{s['overhead_ratio_ci95'][1]:.3f}, {body['overhead']['pairs']} pairs)")
        o, ms = body["overhead"], lambda k: 1e3 * body["overhead"]["cpu_s_per_step"][k]  # noqa: E731
        print(f"monitor CPU per step, all ranks: recorder {ms('recorder_s'):.2f} ms "
              f"({o['recorder_us_per_collective']:.1f} us x {o['collectives_per_rank_step']:.0f} collectives per rank), "
              f"agent threads {ms('agent_thread_s'):.2f} ms, master {ms('master_s'):.2f} ms; the ranks "
              f"{ms('process_s'):.0f} ms")
        print(f"overhead ratio (monitor on / off, median step time): {s['overhead_ratio']:.3f}; false alarms under "
              f"+-50% jitter: {s['false_alarms']} over {body['false_alarm_run']['steps_done']} steps; max detection "
              f"(hangs, crashes): {s['max_detection_s_hang_crash']} s")
    if body.get("stress"):
        st, hang = body["stress"], body["stress"]["hang_run"]
        load = lambda r: f"{r['load']['load1_median']:.1f}/{r['load']['load1_max']:.1f}"  # noqa: E731
        t = Table(title=f"busy machine: {st['cpu_burners']} CPU burners on {st['cores']} cores"
                        f"{' + disk hammer (fsync) in the run directory' if st['disk_hammer'] else ''}; hang: "
                        f"{hang['class']} injected")
        for col in ("run", "done", "steps", "restarts", "incidents", "detect s", "named", "load1 med/max"):
            t.add_column(col)
        for i, r in enumerate(st["clean_runs"]):
            t.add_row(f"clean #{i}", str(r["rc"] == 0), str(r["steps_done"]), str(r["restarts"]),
                      ", ".join(f"{k} {ranks} {a}" for k, ranks, a in r["incidents"]) or "-", "-", "-",
                      load(r))
        t.add_row("hang", str(hang["recovered"]), str(hang["steps_done"]), "-",
                  ", ".join(f"{k} {ranks} {a}" for k, ranks, a in hang["other_incidents"]) or "-",
                  fmt(hang["detection_s"]), str(hang["localised"]),
                  load(hang))
        Console().print(t)
        print(f"false restarts under stress: {s['false_restarts_under_stress']} over {st['repeats']} clean run(s); "
              f"injected {hang['class']} detected in {fmt(s['stress_hang_detection_s'])} s (named: "
              f"{s['stress_hang_localised']}); load average (1 min) median {s['stress_load1_median']}, max "
              f"{s['stress_load1_max']}")
    if body.get("multinode"):
        t = Table(title="2-node job (2 ranks per node, each node in its own network namespace): faults on node 1")
        for col in ("class", "named (nodes)", "detect s", "recovered", "fault-free params", "restart world"):
            t.add_column(col)
        for r in body["multinode"]["classes"]:
            t.add_row(r["class"], f"{r['localised']} ({r['nodes']})", fmt(r["detection_s"]), str(r["recovered"]),
                      "-" if r["params_equal_fault_free"] is None else str(r["params_equal_fault_free"]),
                      str((r["restart"] or {}).get("world", "-")))
        Console().print(t)
    if body.get("rl"):
        rl = body["rl"]
        t = Table(title=f"the RL learner (pliant rl, 2 learner ranks, fault on rank 1 at step 4; clean run "
                        f"{rl['clean_run_s']:.0f} s)")
        for col in ("class", "named as", "localised", "detect s", "restarted from", "every group once",
                    "recovered", "extra run s"):
            t.add_column(col)
        for r in rl["classes"]:
            first = r["runs"][0]
            t.add_row(r["class"], r["kind"], str(r["localised"]), fmt(r["detection_s"]),
                      f"step {first['restarted_from_step']}", str(all(x["groups_once"] for x in r["runs"])),
                      str(r["recovered"]), fmt(r["extra_s"]))
        Console().print(t)
    if body["vs_torchft"]:
        t = Table(title="side by side with torchft (medians)")
        for col in ("fault", "pliant detects s", "pliant names culprit", "torchft notices s", "torchft names culprit",
                    "torchft drops it from quorum s", "torchft / pliant"):
            t.add_column(col)
        for r in body["vs_torchft"]:
            t.add_row(r["fault"], fmt(r["pliant_detection_s"]), str(r["pliant_names_culprit"]),
                      fmt(r["torchft_noticed_s"]), str(r["torchft_names_culprit"]),
                      fmt(r["torchft_dropped_from_quorum_s"]), fmt(r["speedup"]))
        Console().print(t)
