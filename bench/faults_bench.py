"""`pliant bench faults`: every fault class injected into a real supervised job, repeated.

Per class: detection latency (median over repeats, from the injector's record of the moment
the fault struck to the master's incident), whether the culprit was named correctly, time
from the fault to the first step trained after the restart, and steps of work lost. Then
the instrumentation overhead (median step time with the monitor on / off, runs interleaved)
and false alarms over clean steps with injected compute jitter of +-50% on every rank.
Last, torchft side by side (torchft_compare): how long a torchft job takes to notice a
crashed and a hung replica, and whether it names the culprit, beside pliant's crash and
non-communication hang classes.
"""
from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from . import torchft_compare
from .fault_runs import DETECT_S, Job, run_job

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


def measure_overhead(config: Path, work: Path, repeats: int, steps: int, skip: int = 3) -> dict:
    """Step time with the monitor on and off, runs interleaved (on this noisy 2-core machine a
    run's median moves by +-15% from run to run, so both estimates pool many runs): the ratio
    of the medians of all steps (headline), and the median of the ratios of step i on / off
    (the batches are the same in both runs). The first `skip` steps, which build process
    groups, are left out."""
    on, off, paired, pooled_on, pooled_off = [], [], [], [], []
    for i in range(repeats):
        times = {}
        for enabled in (False, True):
            job = run_job(work, f"overhead-{'on' if enabled else 'off'}-{i}", config,
                          overlay={"faults": {"enabled": enabled}, "train": {"steps": steps, "checkpoint_every": steps}})
            if job.rc != 0:
                raise RuntimeError(f"overhead run failed:\n{job.tail()}")
            times[enabled] = step_seconds(job, skip)
        off.append(statistics.median(times[False]))
        on.append(statistics.median(times[True]))
        pooled_off += times[False]
        pooled_on += times[True]
        paired += [a / b for a, b in zip(times[True], times[False])]
    return {"runs": repeats, "step_s_off": off, "step_s_on": on, "median_off": statistics.median(pooled_off),
            "median_on": statistics.median(pooled_on), "paired_steps": len(paired),
            "paired_ratio": statistics.median(paired),
            "overhead_ratio": statistics.median(pooled_on) / statistics.median(pooled_off)}


def measure_false_alarms(config: Path, work: Path, steps: int, compute_s: float) -> dict:
    """Clean steps with every rank's compute stretched by uniform(0, 2c) per step: with c
    the measured compute time, a step's compute ranges over [c, 3c], +-50% around its mean."""
    from pliant.launch.config import load_config

    world = load_config(config).cluster.world_size
    jitter = [{"kind": "jitter", "rank": r, "step": 1, "seconds": 2 * compute_s} for r in range(world)]
    job = run_job(work, "jitter", config, jitter, {"train": {"steps": steps, "checkpoint_every": max(2, steps // 4)}})
    return {"steps": steps, "jitter_s": 2 * compute_s, "rc": job.rc, "steps_done": len(job.metrics),
            "false_alarms": len(job.incidents), "incidents": [(i["kind"], i["ranks"]) for i in job.incidents]}


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
        overhead_repeats: int | None = None) -> dict:
    work = Path(tempfile.mkdtemp(prefix="pliant-bench-faults-"))
    results = []
    for name in classes:
        print(f"class {name}", flush=True)
        results.append(measure_class(name, repeats, config, work))
    print("instrumentation overhead", flush=True)
    overhead = measure_overhead(config, work, overhead_repeats or max(repeats, 5), overhead_steps)
    print(f"  median step {overhead['median_off']:.4f} s off, {overhead['median_on']:.4f} s on: ratio "
          f"{overhead['overhead_ratio']:.4f} (paired {overhead['paired_ratio']:.4f})", flush=True)
    print("false alarms under jitter", flush=True)
    alarms = measure_false_alarms(config, work, jitter_steps, overhead["median_off"])
    torchft = {}
    if torchft_repeats:
        print("torchft side by side", flush=True)
        torchft = torchft_compare.measure(work, torchft_repeats, torchft_faults)
    hang_crash = [r["detection_s"] for r in results if r["class"] in HANG_CRASH and r["detection_s"] is not None]
    summary = {
        "classes": len(results),
        "all_localised": all(r["localised"] for r in results),
        "max_detection_s_hang_crash": max(hang_crash) if hang_crash else None,
        "detection_bound_s": DETECT_S,
        "overhead_ratio": round(overhead["overhead_ratio"], 4),
        "false_alarms": alarms["false_alarms"],
        "repeats": repeats,
    }
    body = {"config": str(config), "summary": summary, "classes": results, "overhead": overhead,
            "false_alarm_run": alarms, "torchft": torchft, "vs_torchft": side_by_side(results, torchft)}
    out.write_text(json.dumps(body, indent=1))
    print_table(body)
    return body


def print_table(body: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="fault classes (medians over repeats)")
    for col in ("class", "localised", "detect s", "resumed s", "steps lost"):
        t.add_column(col)
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for r in body["classes"]:
        t.add_row(r["class"], str(r["localised"]), fmt(r["detection_s"]), fmt(r["resumed_s"]),
                  "-" if r["steps_lost"] is None else str(r["steps_lost"]))
    Console().print(t)
    s = body["summary"]
    print(f"overhead ratio (monitor on / off, median step time): {s['overhead_ratio']:.3f}; false alarms under "
          f"+-50% jitter: {s['false_alarms']} over {body['false_alarm_run']['steps_done']} steps; max detection "
          f"(hangs, crashes): {s['max_detection_s_hang_crash']} s")
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
