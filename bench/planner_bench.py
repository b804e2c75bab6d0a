"""`pliant bench planner`: adaptive plans against the baselines, batch by batch.

For K global batches drawn from a length file or a named distribution, it plans each batch
adaptively and prices, with the same cost model, the run-wide static degree, every fixed
degree, BatchAda (best fixed degree per batch) and the lower bound. Writes JSON (per batch
and a summary with medians and p95s), a PNG, and prints a table.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pliant.planner import ClusterSpec, ModelSpec, Planner, PlanningError, baselines, resolve_source, token_batches
from pliant.planner.blaster import min_micro_batches
from pliant.io import atomic_write_text, strict_dumps


def _q(values: list[float], q: float) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.quantile(v, q)) if v else None


def load_reference(path: str | Path, lengths_file: str | None, dist: str | None, batch_tokens: int,
                   max_len: int | None, seed: int) -> list[dict[str, Any]]:
    """The per-batch rows of an earlier run on the same batches (checked: same source, sizes, seed)."""
    ref = json.loads(Path(path).read_text())
    mine = {"lengths": lengths_file or dist, "batch_tokens": batch_tokens, "max_len": max_len, "seed": seed}
    differ = {k: (ref.get(k), v) for k, v in mine.items() if ref.get(k) != v}
    if differ:
        raise PlanningError(f"--reference {path}: not the same batches: " +
                            ", ".join(f"{k} {a!r} there, {b!r} here" for k, (a, b) in differ.items()))
    return ref["per_batch"]


def run(planner: Planner, cluster: ClusterSpec, model: ModelSpec, config_path: str, lengths_file: str | None,
        dist: str | None, batch_tokens: int, max_len: int | None, n_batches: int, seed: int, out: Path,
        plot: Path | None, console: Console | None = None, reference: str | Path | None = None) -> dict[str, Any]:
    console = console or Console()
    ref_rows = None if reference is None else load_reference(reference, lengths_file, dist, batch_tokens, max_len, seed)
    if ref_rows is not None and len(ref_rows) < n_batches:
        raise PlanningError(f"--reference {reference} has {len(ref_rows)} batches, fewer than --batches {n_batches}")
    source = resolve_source(lengths_file, dist)
    stream = token_batches(source, batch_tokens, max_len, seed)
    run_max = max_len
    rows: list[dict[str, Any]] = []
    static = None
    with Progress(TextColumn("planning batches"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("plan", total=n_batches)
        for i in range(n_batches):
            lengths = next(stream)
            if run_max is None:  # no truncation: the run must allow the longest sequence the source can give
                run_max = int(lengths.max())
            t0 = time.perf_counter()
            plan = planner.plan(lengths)
            solve_s = time.perf_counter() - t0
            base = baselines(planner, lengths, max(run_max, int(lengths.max())))
            floor_ms, spread_ms = planner.cost.simple_bounds_ms(lengths, planner.sizes,
                                                                 min_micro_batches(lengths, planner.cost))
            static = base.static_degree if static is None else static
            st = base.fixed_ms[static] if static in base.fixed_ms else None
            rows.append({
                "index": i,
                "n_seqs": len(lengths),
                "tokens": int(lengths.sum()),
                "longest": int(lengths.max()),
                "adaptive_s": plan.predicted_ms / 1e3,
                "static_s": None if st is None else st / 1e3,
                "fixed_s": {str(s): (None if ms is None else ms / 1e3) for s, ms in base.fixed_ms.items()},
                "fixed_infeasible": [s for s, ms in base.fixed_ms.items() if ms is None],
                "batchada_s": base.batchada_ms / 1e3,
                "batchada_degree": base.batchada_degree,
                "no_sp_s": None if base.no_sp_ms is None else base.no_sp_ms / 1e3,
                "lower_bound_s": plan.lower_bound_ms / 1e3,
                "solve_s": solve_s,
                "micro_batches": len(plan.micro_batches),
                "device_share_by_size": {str(k): v for k, v in plan.device_share_by_size().items()},
                "group_mix": {str(k): v for k, v in sorted(plan.group_mix().items())},
                "answer_from": [mb.stats.source for mb in plan.micro_batches],
                # what the MILP changed: the heuristic's makespan less the kept answer, per micro-batch
                "milp_gain_ms": [(mb.stats.heuristic_ms - mb.predicted_ms) if mb.stats.source == "milp" else 0.0
                                 for mb in plan.micro_batches],
                # what the LP bound adds over the older max(slowest sequence's floor, device-time / N)
                "simple_bound_s": max(floor_ms, spread_ms) / 1e3,
                "reference_s": None if ref_rows is None else ref_rows[i]["adaptive_s"],
                "milp_status": [mb.stats.status for mb in plan.micro_batches],
                "milp_gap": [mb.stats.gap for mb in plan.micro_batches],
            })
            progress.advance(task)

    def col(key: str) -> list[float]:
        return [r[key] for r in rows]

    sp_static = [r["static_s"] / r["adaptive_s"] for r in rows if r["static_s"] is not None]
    sp_bada = [r["batchada_s"] / r["adaptive_s"] for r in rows]
    gap_lb = [r["adaptive_s"] / r["lower_bound_s"] - 1 for r in rows]
    gains = [g for r in rows for g in r["milp_gain_ms"] if g > 0]
    lp_gain = [r["lower_bound_s"] / r["simple_bound_s"] - 1 for r in rows]
    vs_ref = [r["adaptive_s"] / r["reference_s"] for r in rows if r["reference_s"] is not None]
    summary: dict[str, Any] = {"static_degree": static}
    for key in ("adaptive_s", "static_s", "batchada_s", "no_sp_s", "lower_bound_s", "solve_s"):
        summary[f"{key}_median"] = _q(col(key), 0.5)
        summary[f"{key}_p95"] = _q(col(key), 0.95)
    summary.update({
        "speedup_vs_static_median": _q(sp_static, 0.5),
        "speedup_vs_static_min": min(sp_static) if sp_static else None,
        "speedup_vs_batchada_median": _q(sp_bada, 0.5),
        "speedup_vs_batchada_min": min(sp_bada),
        "gap_to_lower_bound_median": _q(gap_lb, 0.5),
        "gap_to_lower_bound_p95": _q(gap_lb, 0.95),
        "adaptive_worse_than_batchada": sum(1 for x in sp_bada if x < 1 - 1e-9),
        "answers_from_milp": sum(r["answer_from"].count("milp") for r in rows),
        "milp_gain_ms_median": _q(gains, 0.5),
        "milp_gain_ms_max": max(gains) if gains else None,
        "lp_bound_raised": sum(1 for x in lp_gain if x > 1e-9),
        "lp_bound_raise_median": _q([x for x in lp_gain if x > 1e-9], 0.5),
        "lp_bound_raise_max": max(lp_gain),
        "over_time_limit": sum(1 for r in rows if r["solve_s"] > planner.spec.time_limit_s),
        "reference": None if reference is None else str(reference),
        "vs_reference_median": _q(vs_ref, 0.5),
        "vs_reference_max": max(vs_ref) if vs_ref else None,
        "worse_than_reference": sum(1 for x in vs_ref if x > 1 + 1e-9),
        "better_than_reference": sum(1 for x in vs_ref if x < 1 - 1e-9),
        "micro_batches": sum(r["micro_batches"] for r in rows),
        "fixed_s_median": {
            s: _q([r["fixed_s"][s] for r in rows if r["fixed_s"][s] is not None], 0.5)
            for s in rows[0]["fixed_s"]
        },
        "fixed_infeasible_batches": {s: sum(1 for r in rows if r["fixed_s"][s] is None) for s in rows[0]["fixed_s"]},
    })
    result = {
        "benchmark": "planner",
        "config": str(config_path),
        "cluster": {"nodes": cluster.nodes, "devices_per_node": cluster.devices_per_node,
                    "device_memory_gib": cluster.device_memory_gib},
        "model": model.name,
        "lengths": lengths_file or dist,
        "batch_tokens": batch_tokens,
        "max_len": max_len,
        "batches": n_batches,
        "seed": seed,
        "solver": planner.solver,
        "time_limit_s": planner.spec.time_limit_s,
        "host": {"machine": platform.machine(), "python": platform.python_version()},
        "per_batch": rows,
        "summary": summary,
    }
    atomic_write_text(out, strict_dumps(result, indent=1))
    if plot is not None:
        write_plot(rows, static, plot)
    print_summary(result, console)
    return result


def print_summary(result: dict[str, Any], console: Console) -> None:
    s = result["summary"]
    t = Table(title=f"planner benchmark: {result['batches']} batches of {result['batch_tokens']:,} tokens "
                    f"from {result['lengths']} (max len {result['max_len']})", title_justify="left")
    t.add_column("plan")
    t.add_column("step s (median)", justify="right")
    t.add_column("p95", justify="right")
    t.add_column("adaptive speedup (median)", justify="right")

    def fmt(x):
        return "-" if x is None else f"{x:.3f}"

    ad = s["adaptive_s_median"]
    t.add_row("adaptive", fmt(ad), fmt(s["adaptive_s_p95"]), "1.00")
    t.add_row(f"static (SP={s['static_degree']})", fmt(s["static_s_median"]), fmt(s["static_s_p95"]),
              fmt(s["speedup_vs_static_median"]))
    t.add_row("BatchAda", fmt(s["batchada_s_median"]), fmt(s["batchada_s_p95"]),
              f"{fmt(s['speedup_vs_batchada_median'])} (min {fmt(s['speedup_vs_batchada_min'])})")
    for deg, med in s["fixed_s_median"].items():
        inf = s["fixed_infeasible_batches"][deg]
        t.add_row(f"fixed SP={deg}", fmt(med) + (f" ({inf} infeasible)" if inf else ""), "", "")
    t.add_row("lower bound", fmt(s["lower_bound_s_median"]), fmt(s["lower_bound_s_p95"]),
              f"gap {s['gap_to_lower_bound_median']:.1%}")
    console.print(t)
    console.print(f"solve time: median {s['solve_s_median']:.3f} s, p95 {s['solve_s_p95']:.3f} s "
                  f"(wall {result['time_limit_s']} s, passed in {s['over_time_limit']} batches; "
                  f"solver {result['solver']})")
    gain = "" if not s["answers_from_milp"] else (f", by {s['milp_gain_ms_median']:.1f} ms median, "
                                                  f"{s['milp_gain_ms_max']:.1f} ms most")
    console.print(f"MILP answer kept in {s['answers_from_milp']} of {s['micro_batches']} micro-batches{gain}; "
                  f"the LP bound raised the simple bound in {s['lp_bound_raised']} of {result['batches']} batches "
                  f"(by {s['lp_bound_raise_max']:.1%} at most)")
    if s["reference"] is not None:
        console.print(f"against {s['reference']}: median ratio {s['vs_reference_median']:.4f}, "
                      f"worst {s['vs_reference_max']:.4f}; better on {s['better_than_reference']}, "
                      f"worse on {s['worse_than_reference']} of {result['batches']} batches")


def write_plot(rows: list[dict[str, Any]], static: int | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    idx = np.arange(len(rows))
    for key, label, style in (("static_s", f"static SP={static}", "s-"), ("batchada_s", "BatchAda", "^-"),
                              ("adaptive_s", "adaptive", "o-"), ("lower_bound_s", "lower bound", "k--")):
        y = [np.nan if r[key] is None else r[key] for r in rows]
        ax1.plot(idx, y, style, label=label, markersize=4)
    ax1.set_ylabel("predicted step time (s)")
    ax1.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax1.set_title("step time per global batch")
    sizes = sorted({int(k) for r in rows for k in r["device_share_by_size"]})
    bottom = np.zeros(len(rows))
    cmap = plt.get_cmap("viridis", max(len(sizes), 2))
    for i, s in enumerate(sizes):
        share = np.array([r["device_share_by_size"].get(str(s), 0.0) for r in rows])
        ax2.bar(idx, share, bottom=bottom, color=cmap(i), label=f"SP={s}")
        bottom += share
    ax2.set_ylabel("share of devices")
    ax2.set_xlabel("batch")
    ax2.set_title("adaptive group-size mix (devices in groups of each size)")
    ax2.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
