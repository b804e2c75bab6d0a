"""`pliant profile`: measure the cost-model coefficients on this machine and write them in
the config's form (a YAML overlay: `--config base.yaml --config coeffs.yaml`).

Per rank (under torchrun, like `pliant train`):

1. time forward + backward packs (groups of one, and every planned size > 1), and
   all-to-all / all-gather over the same group tilings;
2. fit bandwidth and latency per group size, then a1, a2, the per-sequence and per-group
   overheads with the comm terms priced at those bandwidths; activation bytes per token;
3. calibrate the per-step overhead (gradient reduction, optimizer, plan exchange) on a few
   real training steps with the fitted coefficients, and report measured vs predicted.
"""
from __future__ import annotations

import argparse
import datetime
import socket
import statistics
from pathlib import Path

import yaml

from pliant.io import strict_dumps


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def profile_cases(max_len: int, sizes: list[int], quick: bool) -> list[tuple[int, list[int]]]:
    """(group size, lengths) of the packs to time: single sequences over the length range and
    packs of many short ones (the per-sequence overhead) in groups of one; a few of each for
    larger groups."""
    top = min(max_len, 512) if quick else max_len
    singles = sorted({min(top, L) for L in (64, 256, 1024, top // 2, top)})
    cases = [(1, [L]) for L in singles] + [(1, [64] * 16), (1, [256] * 8)]
    for s in sizes:
        if s > 1:
            cases += [(s, [L]) for L in sorted({256, top // 2, top})] + [(s, [128] * 8)]
    return cases


def coeffs_document(bandwidth: dict | None, cost: dict, header: str) -> str:
    doc: dict = {}
    if bandwidth is not None:
        doc["cluster"] = {"bandwidth": bandwidth}
    doc["cost"] = cost
    lines = "".join(f"# {line}\n" for line in header.splitlines())
    return lines + yaml.safe_dump(doc, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("pliant-profile")
    p.add_argument("--config", required=True, action="append")
    p.add_argument("--out", required=True)
    p.add_argument("--report", default=None, help="JSON with every timing and fit (default: --out with .json)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--calibration-steps", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="short sequences and few repeats (tests)")
    args = p.parse_args(argv)

    import numpy as np
    import torch
    import torch.distributed as dist

    from pliant.config import load_config
    from pliant.planner.cost import CostModel
    from pliant.planner.spec import BandwidthSpec, CostSpec
    from pliant.runtime import profiler as prof
    from pliant.runtime.hf import build_model
    from pliant.runtime.rank import setup_rank
    from pliant.runtime.trainer import Trainer

    cfg = load_config(args.config)
    c = cfg.cluster
    setup = setup_rank(c, cfg.model, cfg.cost, cfg.planner)
    rank, world, device, planner, registry = setup.rank, setup.world, setup.device, setup.planner, setup.registry
    torch.manual_seed(0)
    model = build_model(cfg.model, device)  # the job's model (model.hf_path when given), outside DeepSpeed
    max_len = cfg.train.max_len or 4096
    repeats = 1 if args.quick else args.repeats
    say = print if rank == 0 else (lambda *a, **k: None)

    say(f"profiling {cfg.model.name} on {world} ranks ({c.device}, {c.backend})", flush=True)
    packs = prof.time_packs(model, registry, profile_cases(max_len, planner.sizes, args.quick), c.devices_per_node,
                            device, planner.cost.sp_form, repeats=repeats)
    multi = [s for s in planner.sizes if s > 1]
    message_bytes = [1 << 14, 1 << 16, 1 << 18] if args.quick else [1 << 16, 1 << 18, 1 << 20, 1 << 22]
    collectives = prof.time_collectives(registry, multi, message_bytes, c.devices_per_node, device,
                                        repeats=max(3, repeats))
    links = prof.fit_links(collectives)
    cluster = c
    bandwidth = None
    if multi:
        bandwidth = {f"{op}_gbps": {lf.size: _sig(lf.gbps) for lf in links if lf.op == op}
                     for op in ("all_to_all", "all_gather")}
        # the measured tables replace an intra/inter-node pair the base config may give
        bandwidth.update(intra_node_gbps=None, inter_node_gbps=None)
        cluster = c.model_copy(update={"bandwidth": BandwidthSpec(**bandwidth)})
    act = prof.activation_bytes_per_token(model, registry.get(rank, 1), device)
    base_cost = cfg.cost.model_copy(update={"seq_overhead_ms": 0.0, "step_overhead_ms": 0.0})
    fit = prof.fit_compute(packs, CostModel.from_specs(cluster, cfg.model, base_cost, cfg.planner),
                           quadratic=cfg.model.n_softmax > 0)
    a1 = fit.a1_eff_ms * cfg.model.layers / cfg.model.n_softmax if cfg.model.n_softmax else 0.0
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    cost = CostSpec(a1_ms=_sig(a1), a2_ms=_sig(max(fit.a2_ms, 1e-9)), beta_ms=_sig(fit.beta_ms),
                    activation_bytes_per_token=_sig(act), seq_overhead_ms=_sig(fit.gamma_ms),
                    source=f"pliant profile on {socket.gethostname()}, {when}, {world} ranks ({c.device})")

    # calibration: real steps with the fitted coefficients, on batches the benchmarks do not use
    steps = max(3, args.calibration_steps)
    calibration = cfg.model_copy(update={"cluster": cluster, "cost": cost,
                                         "data": cfg.data.model_copy(update={"seed": cfg.data.seed + 7919})})
    trainer = Trainer.from_config(calibration, registry=registry, steps=max(steps, cfg.train.steps))
    try:
        results = [trainer.train_step() for _ in range(steps)]
    finally:
        trainer.close()
    used = results[min(2, steps - 1):]  # the first steps warm up DeepSpeed and the allocator
    overhead = max(0.0, statistics.median(r.seconds - r.predicted_s for r in used) * 1e3)
    cost = cost.model_copy(update={"step_overhead_ms": _sig(overhead)})
    calib = [{"step": r.step, "measured_s": r.seconds, "predicted_s": r.predicted_s + overhead / 1e3,
              "group_mix": r.group_mix} for r in results]
    err = [abs(s["predicted_s"] - s["measured_s"]) / s["measured_s"] for s in calib[min(2, steps - 1):]]

    if rank == 0:
        result = prof.ProfileResult(packs, collectives, links, fit, act, overhead, calib)
        header = (f"cost-model coefficients measured by `pliant profile` ({cost.source});\n"
                  f"use as an overlay: --config {' --config '.join(args.config)} --config {args.out}")
        Path(args.out).write_text(coeffs_document(bandwidth, cost.model_dump(mode="json"), header))
        report = Path(args.report) if args.report else Path(args.out).with_suffix(".json")
        summary = {"config": args.config, "cost": cost.model_dump(mode="json"), "bandwidth": bandwidth,
                   "pack_fit_median_rel_error": fit.median_rel_error, "pack_fit_max_rel_error": fit.max_rel_error,
                   "calibration_step_error_median": float(np.median(err))}
        report.write_text(strict_dumps({"summary": summary, **result.to_dict()}, indent=1))
        print_profile(result, cost, float(np.median(err)))
        print(f"wrote {args.out} and {report}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def print_profile(result, cost, step_error: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title="forward + backward per pack (slowest rank, median)")
    for col in ("group", "lengths", "measured ms", "fitted ms", "error"):
        t.add_column(col, justify="right")
    for p in result.packs:
        lengths = f"{len(p.lengths)} x {p.lengths[0]}" if len(set(p.lengths)) == 1 and len(p.lengths) > 1 \
            else ",".join(map(str, p.lengths))
        t.add_row(str(p.size), lengths, f"{p.ms:.1f}", f"{p.fitted_ms:.1f}", f"{(p.fitted_ms / p.ms - 1):+.1%}")
    console.print(t)
    if result.links:
        lt = Table(title="collectives per group size")
        for col in ("op", "group", "GB/s", "latency ms"):
            lt.add_column(col, justify="right")
        for lf in result.links:
            lt.add_row(lf.op, str(lf.size), f"{lf.gbps:.3f}", f"{lf.latency_ms:.2f}")
        console.print(lt)
    st = Table(title="calibration steps: measured vs predicted step time")
    for col in ("step", "groups", "measured s", "predicted s"):
        st.add_column(col, justify="right")
    for s in result.steps:
        mix = " ".join(f"{n}x{k}" for k, n in sorted(s["group_mix"].items()))
        st.add_row(str(s["step"]), mix, f"{s['measured_s']:.3f}", f"{s['predicted_s']:.3f}")
    console.print(st)
    console.print(f"a1 {cost.a1_ms:.4g} ms  a2 {cost.a2_ms:.4g} ms  beta {cost.beta_ms:.4g} ms  "
                  f"per-sequence {cost.seq_overhead_ms:.4g} ms  per-step {cost.step_overhead_ms:.4g} ms  "
                  f"activations {cost.activation_bytes_per_token:.4g} B/token  "
                  f"(calibration step error median {step_error:.1%})")


if __name__ == "__main__":
    raise SystemExit(main())
