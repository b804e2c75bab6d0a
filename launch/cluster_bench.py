"""`pliant bench cluster` (issue 31): adaptive SP measured where communication costs what it
does on a cluster. The config's nodes become network namespaces on one machine, joined through
a bridge whose links tc's token bucket limits (bench/cluster_net.py), at a rate derived from a
reference cluster's cost model (bench/cluster_rate.py). On that emulated cluster, every node
runs the real multi-node commands in its namespace:

1. `pliant profile --node-rank I`: the bandwidth per group size (a group of 2 stays on its
   node; a group of 4 crosses the link) and the compute coefficients, as an overlay;
2. `pliant bench train --node-rank I --batchada`, under the fault supervisor and its monitor:
   adaptive, every static degree that holds the longest sequence, BatchAda and, where the
   longest sequence fits one rank, data parallel, round robin over the same batches, their
   plans priced with the profiled overlay.

The same again at other link rates (the sweep), then one JSON, a table and a PNG.
Everything that can be checked without the network is checked before the first namespace
exists: the rate, root, `ip` and `tc`, and whether this machine can host the ranks.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from pliant.bench.cluster_net import ClusterNetError, ClusterNetwork, check_host
from pliant.bench.cluster_rate import RateDerivation, derive_link_mbit
from pliant.config import JobConfig, load_config
from pliant.io import atomic_write_text, strict_dumps

REFERENCE = Path(__file__).resolve().parents[1] / "configs" / "flexsp-7b-64gpu.yaml"
REFERENCE_LENGTH = 191_872  # its longest Wikipedia document, which needs a group of 16 (across two nodes)
RANK_MEMORY_GIB = 1.0  # what one CPU rank of the emulated job needs (torch, DeepSpeed, the model, its buffers)
RANKS_PER_CORE = 4  # more ranks than this per core measure the scheduler, not the link


def cost_model(cfg: JobConfig):
    from pliant.planner.core import Planner

    return Planner.from_specs(cfg.cluster, cfg.model, cfg.cost, cfg.planner).cost


def derive(cfg: JobConfig) -> RateDerivation:
    """The link rate at which the emulated cluster's cross-node group spends the reference's
    share of its time communicating, for the config's longest sequence."""
    ref = load_config([str(REFERENCE)])
    max_len = cfg.train.max_len or cfg.train.batch_tokens
    return derive_link_mbit(cost_model(ref), ref.cluster.devices_per_node, REFERENCE_LENGTH, cost_model(cfg),
                            cfg.cluster.devices_per_node, REFERENCE_LENGTH / max_len)


def check_capacity(cfg: JobConfig, cores: int | None = None, memory_gib: float | None = None) -> dict:
    """Can this machine host the emulated cluster's ranks? ClusterNetError naming the limit if not."""
    import psutil

    c = cfg.cluster
    ranks = c.nodes * c.devices_per_node
    cores = cores or os.cpu_count() or 1
    memory_gib = memory_gib if memory_gib is not None else psutil.virtual_memory().available / 2 ** 30
    if c.device != "cpu":
        raise ClusterNetError(f"cluster.device = {c.device!r}: an emulated cluster runs CPU ranks (device: cpu)")
    if ranks > RANKS_PER_CORE * cores:
        raise ClusterNetError(f"{c.nodes} nodes x {c.devices_per_node} ranks = {ranks} ranks on {cores} cores: this "
                              f"machine hosts at most {RANKS_PER_CORE * cores} ({RANKS_PER_CORE} per core); use fewer "
                              f"nodes or cluster.devices_per_node")
    if ranks * RANK_MEMORY_GIB > memory_gib:
        raise ClusterNetError(f"{ranks} ranks need about {ranks * RANK_MEMORY_GIB:g} GiB ({RANK_MEMORY_GIB:g} each); "
                              f"this machine has {memory_gib:.1f} GiB available")
    if c.cores is not None and c.cores * c.nodes > cores:  # (cluster.cores counts one node's cores)
        raise ClusterNetError(f"cluster.cores = {c.cores} per node: the config prices {c.cores * c.nodes} cores for "
                              f"its {c.nodes} nodes, and their ranks share this machine's {cores}")
    return {"ranks": ranks, "cores": cores, "memory_gib_available": round(memory_gib, 1),
            "cores_priced": None if c.cores is None else c.cores * c.nodes}


def _cli(sub: list[str], configs: list[Path]) -> list[str]:
    cmd = [sys.executable, "-m", "pliant.launch.cli", *sub]
    for path in configs:
        cmd += ["--config", str(path)]
    return cmd


def on_every_node(net: ClusterNetwork, work: Path, name: str, cmd: list[str], timeout_s: float) -> None:
    """`cmd --node-rank I` in every node's namespace, at once; raises RuntimeError with the logs'
    tails when one fails or the deadline passes (every node's processes are then killed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME", "PLIANT_FAULT"):  # pliant binds gloo to each node's link
        env.pop(var, None)
    logs = [work / f"{name}-node{i}.log" for i in range(len(net.nodes))]
    procs = [node.popen(cmd + ["--node-rank", str(i)], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
             for i, (node, log) in enumerate(zip(net.nodes, logs))]
    deadline = time.monotonic() + timeout_s
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if any(p.poll() not in (None, 0) for p in procs):
            time.sleep(5.0)  # the other nodes notice the failure in their collectives: give them a moment
            break
        time.sleep(0.5)
    late = [i for i, p in enumerate(procs) if p.poll() is None]
    for node in net.nodes:
        node.kill_all()
    rcs = [p.wait() for p in procs]
    if late or any(rcs):
        tails = "\n".join(f"===== node {i} (exit {rc}{', timed out' if i in late else ''}): {log}\n"
                          f"{log.read_text()[-3000:]}" for i, (rc, log) in enumerate(zip(rcs, logs)))
        raise RuntimeError(f"{name} failed on the emulated cluster:\n{tails}")


def measure(cfg_names: list[str], cfg: JobConfig, link_mbit: float, work: Path, rounds: int, steps_per_round: int,
            warmup: int, timeout_s: float) -> dict:
    """Profile and bench on a fresh emulated cluster at `link_mbit`: the bench's JSON, with the
    profiled overlay and the network's description."""
    work.mkdir(parents=True, exist_ok=True)
    with ClusterNetwork(cfg.cluster.nodes, link_mbit) as net:
        hosts = work / "hosts.yaml"
        hosts.write_text(yaml.safe_dump({"cluster": {"hosts": [n.addr for n in net.nodes],
                                                     "rendezvous_timeout_s": 60}}))
        configs = [Path(p) for p in cfg_names] + [hosts]
        coeffs = work / "coeffs.yaml"
        t0 = time.monotonic()
        on_every_node(net, work, "profile", _cli(["profile"], configs) + ["--out", str(coeffs)], timeout_s)
        profile_s = time.monotonic() - t0
        out = work / "bench-train.json"
        t0 = time.monotonic()
        on_every_node(net, work, "bench", _cli(["bench", "train"], configs + [coeffs]) + [
            "--out", str(out), "--run-dir", str(work / "run"), "--batchada", "--rounds", str(rounds),
            "--steps-per-round", str(steps_per_round), "--warmup", str(warmup)], timeout_s)
        bench_s = time.monotonic() - t0
        network = net.describe()
    body = json.loads(out.read_text())
    profiled = yaml.safe_load(coeffs.read_text())
    return {"link_mbit": link_mbit, "network": network, "profile": profiled, "profile_s": round(profile_s, 1),
            "bench_s": round(bench_s, 1), "modes": body["modes"], "summary": body["summary"],
            "derived_with_profile": derive(load_config(cfg_names + [str(hosts), str(coeffs)])).to_dict()}


def summarize(point: dict) -> dict:
    """The issue's figures for one link rate."""
    s, modes = point["summary"], point["modes"]
    statics = {k: v for k, v in modes.items() if k.startswith("static-")}
    best = min(statics, key=lambda k: statics[k]["median_step_s"])
    predicted_best = min(statics, key=lambda k: statics[k]["median_predicted_s"])
    ad = modes["adaptive"]
    pb = s.get("paired_vs_batchada") or {}
    return {
        "link_mbit": point["link_mbit"],
        "best_static": best,
        "measured_speedup_vs_best_static": statics[best]["median_step_s"] / ad["median_step_s"],
        "predicted_speedup_vs_best_static": statics[predicted_best]["median_predicted_s"] / ad["median_predicted_s"],
        "measured_speedup_vs_batchada": s["speedup_vs_batchada"],
        "predicted_speedup_vs_batchada": s["predicted_speedup_vs_batchada"],
        # the same batches paired (bench/train_bench.py's `paired`): the median per-batch ratio and
        # its 95% interval, total time, and the batches on which the two plans differ
        "paired_speedup_vs_batchada": pb.get("median_ratio"),
        "paired_speedup_vs_batchada_ci95": pb.get("median_ratio_ci95"),
        "throughput_speedup_vs_batchada": pb.get("throughput_ratio"),
        "batches_plans_differ_vs_batchada": pb.get("plans_differ"),
        "speedup_vs_batchada_where_plans_differ": pb.get("median_ratio_where_plans_differ"),
        "batches": pb.get("batches"),
        "prediction_error_median": s["prediction_error_median"],
        "prediction_error_median_per_mode": {k: v["prediction_error_median"] for k, v in modes.items()},
    }


def run(cfg_names: list[str], out: Path, link_mbit: float | None, sweep: tuple[float, ...], rounds: int,
        steps_per_round: int, warmup: int, timeout_s: float) -> int:
    cfg = load_config(cfg_names)
    derivation = derive(cfg)
    rate = float(link_mbit) if link_mbit is not None else derivation.link_mbit
    rates = [rate] + [rate * f for f in sweep]
    for r in rates:  # every check that needs no network, before the first namespace
        check_host(cfg.cluster.nodes, r)
    capacity = check_capacity(cfg)
    print(f"emulated cluster: {cfg.cluster.nodes} nodes x {cfg.cluster.devices_per_node} ranks on {capacity['cores']} "
          f"cores; link rate {rate:.4g} Mbit/s ({'given' if link_mbit is not None else derivation.formula})",
          flush=True)
    work = out.parent / f"{out.stem}-work"
    points = []
    for k, r in enumerate(rates):
        print(f"link {r:.4g} Mbit/s: profile, then bench ({k + 1}/{len(rates)})", flush=True)
        points.append(measure(cfg_names, cfg, r, work / f"rate-{k}", rounds, steps_per_round, warmup, timeout_s))
        print(f"  {json.dumps({key: round(v, 3) if isinstance(v, float) else v for key, v in summarize(points[-1]).items() if not isinstance(v, dict)})}",
              flush=True)
    main = summarize(points[0])
    sweep_rows = sorted((summarize(p) for p in points), key=lambda row: row["link_mbit"])
    body = {"benchmark": "cluster", "config": cfg_names, "reference": str(REFERENCE),
            "derivation": derivation.to_dict(), "capacity": capacity,
            "summary": {**{k: v for k, v in main.items() if k != "prediction_error_median_per_mode"},
                        "link_derived": link_mbit is None, "nodes": cfg.cluster.nodes,
                        "ranks_per_node": cfg.cluster.devices_per_node, "cores": capacity["cores"],
                        "prediction_error_max_mode": max(main["prediction_error_median_per_mode"].values()),
                        "rates_under_1.05x": [row["link_mbit"] for row in sweep_rows
                                              if row["measured_speedup_vs_best_static"] < 1.05]},
            "sweep": sweep_rows, "points": points}
    atomic_write_text(out, strict_dumps(body, indent=1))
    png = out.with_suffix(".png")
    plot(sweep_rows, png, points[0]["link_mbit"])
    print_table(body)
    print(f"wrote {out} and {png}", flush=True)
    return 0


def plot(rows: list[dict], path: Path, derived: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    x = [r["link_mbit"] for r in rows]
    ax.plot(x, [r["measured_speedup_vs_best_static"] for r in rows], "o-", label="measured vs best static")
    ax.plot(x, [r["predicted_speedup_vs_best_static"] for r in rows], "s--", label="predicted vs best static")
    ax.plot(x, [r["measured_speedup_vs_batchada"] for r in rows], "^-", label="measured vs BatchAda")
    ax.axhline(1.05, color="grey", lw=0.8, ls=":")
    ax.axvline(derived, color="grey", lw=0.8, ls="--", label="derived rate")
    ax.set_xscale("log")
    ax.set_xlabel("link rate (Mbit/s, each way)")
    ax.set_ylabel("adaptive speedup (median step time)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _paired(row: dict) -> str:
    if row.get("paired_speedup_vs_batchada") is None:
        return "-"
    lo, hi = row["paired_speedup_vs_batchada_ci95"]
    return f"{row['paired_speedup_vs_batchada']:.2f}x ({lo:.2f}-{hi:.2f})"


def print_table(body: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="adaptive SP on the emulated cluster, by link rate")
    for col in ("link Mbit/s", "best static", "measured vs static", "predicted vs static", "measured vs BatchAda",
                "paired vs BatchAda (95% CI)", "where plans differ", "prediction error (median, worst mode)"):
        t.add_column(col, justify="right")
    for r in body["sweep"]:
        t.add_row(f"{r['link_mbit']:.4g}", r["best_static"], f"{r['measured_speedup_vs_best_static']:.2f}x",
                  f"{r['predicted_speedup_vs_best_static']:.2f}x", f"{r['measured_speedup_vs_batchada']:.2f}x",
                  _paired(r),
                  "-" if r.get("speedup_vs_batchada_where_plans_differ") is None else
                  f"{r['speedup_vs_batchada_where_plans_differ']:.2f}x ({r['batches_plans_differ_vs_batchada']} of "
                  f"{r['batches']})",
                  f"{r['prediction_error_median']:.1%}, {max(r['prediction_error_median_per_mode'].values()):.1%}")
    Console(width=170).print(t)
    print(f"derived link rate: {body['derivation']['formula']}")
    print(f"with the profiled coefficients: {body['points'][0]['derived_with_profile']['formula']}")

