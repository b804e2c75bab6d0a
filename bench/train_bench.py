"""`pliant bench train`: measured step time of adaptive SP against every static degree,
BatchAda (with --batchada) and plain data parallel, on the same long-tail batches, in one job.

Every rank builds one `Trainer` per plan mode (adaptive; static at each uniform degree > 1
that holds the longest sequence; batchada, the best uniform degree per batch; dp where the
longest sequence fits one device), all sharing the process groups. The modes take turns
in rounds of a few steps each (round robin, so that a noisy machine slows them alike; each
round starts with the next mode), each continuing its own run over the same batch stream. Step times after each mode's warm-up
steps are kept; medians, ratios, and the cost model's prediction error per step are
written as JSON by rank 0, with a table.
"""
from __future__ import annotations

import argparse
import platform
import statistics
from pathlib import Path

from pliant.io import atomic_write_text, strict_dumps


def paired(records: list[dict], warmup: int, base: str, mode: str = "adaptive", seed: int = 0) -> dict:
    """`base`'s step time over `mode`'s on the same batches (the modes run the same batch stream):
    the median of the per-batch ratios with its 95% bootstrap interval, the ratio of total times
    (throughput), and the batches on which the two modes' plans differ in group mix or
    micro-batch count, with the median ratio there (where they agree, the ratio is noise)."""
    import numpy as np

    def key(r: dict) -> tuple:
        return tuple(sorted(r.get("group_mix", {}).items())), r.get("micro_batches")

    steps: dict[int, dict[str, dict]] = {}
    for r in records:
        if r["step"] > warmup and r["mode"] in (base, mode):
            steps.setdefault(r["step"], {})[r["mode"]] = r
    pairs = [(v[base], v[mode]) for _, v in sorted(steps.items()) if len(v) == 2]
    if not pairs:
        raise ValueError(f"no batch ran under both {base} and {mode}")
    ratio = np.array([b["seconds"] / m["seconds"] for b, m in pairs])
    differ = np.array([key(b) != key(m) for b, m in pairs])
    rng = np.random.default_rng(seed)
    boot = np.median(rng.choice(ratio, size=(2000, len(ratio))), axis=1)
    return {"batches": len(pairs), "median_ratio": float(np.median(ratio)),
            "median_ratio_ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
            "throughput_ratio": sum(b["seconds"] for b, _ in pairs) / sum(m["seconds"] for _, m in pairs),
            "plans_differ": int(differ.sum()),
            "median_ratio_where_plans_differ": float(np.median(ratio[differ])) if differ.any() else None,
            "median_ratio_where_plans_agree": float(np.median(ratio[~differ])) if (~differ).any() else None}


def summarize(records: list[dict], warmup: int) -> dict:
    """Medians per mode, the best static degree, ratios, prediction error (records: one per
    step with mode, round, step, seconds, predicted_s)."""
    modes: dict[str, dict] = {}
    for name in dict.fromkeys(r["mode"] for r in records):
        mine = [r for r in records if r["mode"] == name and r["step"] > warmup]
        if not mine:
            raise ValueError(f"mode {name}: no steps after the {warmup} warm-up steps")
        errors = [abs(r["predicted_s"] - r["seconds"]) / r["seconds"] for r in mine]
        rounds = sorted({r["round"] for r in mine})
        modes[name] = {
            "median_step_s": statistics.median(r["seconds"] for r in mine),
            "median_predicted_s": statistics.median(r["predicted_s"] for r in mine),
            "prediction_error_median": statistics.median(errors),
            "round_medians_s": [statistics.median(r["seconds"] for r in mine if r["round"] == k) for k in rounds],
            "steps": len(mine),
            "plan_wait_median_s": statistics.median(r.get("plan_wait_s", 0.0) for r in mine),
            "final_loss": [r["loss"] for r in records if r["mode"] == name][-1],
        }
    statics = {k: v for k, v in modes.items() if k.startswith("static-")}
    if "adaptive" not in modes or not statics:
        raise ValueError(f"need adaptive and at least one static mode, got {sorted(modes)}")
    best = min(statics, key=lambda k: statics[k]["median_step_s"])
    ad, st, dp, ba = modes["adaptive"], modes[best], modes.get("dp"), modes.get("batchada")
    per_round = [s / a for s, a in zip(st["round_medians_s"], ad["round_medians_s"])]
    all_errors = [abs(r["predicted_s"] - r["seconds"]) / r["seconds"] for r in records if r["step"] > warmup]
    # with calibration on: the same steps as the configured coefficients price them
    configured = [abs(r["predicted_configured_s"] - r["seconds"]) / r["seconds"] for r in records
                  if r["step"] > warmup and r.get("predicted_configured_s") is not None]
    return {
        "modes": modes,
        "summary": {
            "adaptive_step_s": ad["median_step_s"],
            "static_step_s": st["median_step_s"],
            "static_degree": int(best.split("-")[1]),
            "dp_step_s": dp["median_step_s"] if dp else None,  # None: the longest sequence needs SP
            "batchada_step_s": ba["median_step_s"] if ba else None,
            "speedup_vs_static": st["median_step_s"] / ad["median_step_s"],
            "speedup_vs_dp": dp["median_step_s"] / ad["median_step_s"] if dp else None,
            "speedup_vs_batchada": ba["median_step_s"] / ad["median_step_s"] if ba else None,
            "predicted_speedup_vs_static": st["median_predicted_s"] / ad["median_predicted_s"],
            "predicted_speedup_vs_batchada": ba["median_predicted_s"] / ad["median_predicted_s"] if ba else None,
            "speedup_vs_static_per_round": per_round,
            "prediction_error_median": statistics.median(all_errors),
            "prediction_error_median_adaptive": ad["prediction_error_median"],
            "prediction_error_median_uncalibrated": statistics.median(configured) if configured else None,
            "paired_vs_static": paired(records, warmup, best),
            "paired_vs_batchada": paired(records, warmup, "batchada") if ba else None,
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("pliant-bench-train")
    p.add_argument("--config", required=True, action="append")
    p.add_argument("--out", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps-per-round", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="first steps of each mode left out")
    p.add_argument("--batchada", action="store_true", help="add BatchAda: the best uniform degree per batch")
    p.add_argument("--resume", action="store_true",
                   help="(a supervisor's restart) the bench starts over: its records are kept by rank 0 only at the end")
    args = p.parse_args(argv)

    from pliant.config import load_config
    from pliant.runtime.monitoring import RankMonitor

    cfg = load_config(args.config)
    # under the fault supervisor (a multi-node bench), the fault monitor's agent: before DeepSpeed
    # starts, as in `pliant train`'s worker; otherwise it does nothing
    monitor = RankMonitor(cfg.faults, None)
    try:
        rc = _bench(args, cfg, monitor)
    except BaseException as e:
        monitor.close_on(e)
        raise
    monitor.close("finished")
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    return rc


def _bench(args, cfg, monitor) -> int:
    import numpy as np

    from pliant.runtime.rank import setup_rank
    from pliant.runtime.trainer import Trainer

    c = cfg.cluster
    setup = setup_rank(c, cfg.model, cfg.cost, cfg.planner)
    rank, world, planner, registry = setup.rank, setup.world, setup.planner, setup.registry
    total = args.rounds * args.steps_per_round
    max_len = cfg.train.max_len or cfg.train.batch_tokens
    degrees = [s for s in planner.fixed_degrees() if s > 1 and planner.cost.seq_fits(np.array([max_len]), s)[0]]
    if not degrees:
        raise SystemExit(f"pliant bench train: no uniform degree > 1 holds max_len={max_len}")
    modes = {"adaptive": {"plan": "adaptive"}, **{f"static-{s}": {"plan": "static", "static_degree": s}
                                                   for s in degrees}}
    if args.batchada:
        modes["batchada"] = {"plan": "batchada"}
    if planner.cost.seq_fits(np.array([max_len]), 1)[0]:  # data parallel where the longest sequence fits a device
        modes["dp"] = {"plan": "dp"}
    trainers = {name: Trainer.from_config(cfg, registry=registry, steps=total, **upd) for name, upd in modes.items()}
    for trainer in trainers.values():
        monitor.attach(trainer)
    records: list[dict] = []
    marks = 0  # the monitor's step count runs over every mode's steps
    try:
        names = list(trainers)
        for rnd in range(args.rounds):
            # each round starts with the next mode, so that no mode always follows the same one
            for name in names[rnd % len(names):] + names[:rnd % len(names)]:
                trainer = trainers[name]
                for _ in range(args.steps_per_round):
                    marks += 1
                    monitor.begin_step(marks)
                    r = trainer.train_step()
                    records.append({"mode": name, "round": rnd, "step": r.step, "seconds": r.seconds,
                                    "predicted_s": r.predicted_s, "predicted_configured_s": r.predicted_configured_s,
                                    "loss": r.loss, "tokens": r.tokens, "plan_wait_s": r.plan_wait_s,
                                    "group_mix": r.group_mix, "micro_batches": r.micro_batches})
                if rank == 0:
                    done = records[-1]
                    print(f"round {rnd + 1}/{args.rounds} {name:10s} last step {done['seconds']:.3f}s "
                          f"(predicted {done['predicted_s']:.3f}s)", flush=True)
    finally:
        for trainer in trainers.values():
            trainer.close()
    if rank == 0:
        result = summarize(records, args.warmup)
        doc = {"benchmark": "train", "config": args.config, "world_size": world, "device": c.device,
               "host": platform.node(), "rounds": args.rounds, "steps_per_round": args.steps_per_round,
               "warmup": args.warmup, "cost": cfg.cost.model_dump(mode="json"), **result, "records": records}
        atomic_write_text(Path(args.out), strict_dumps(doc, indent=1))
        print_table(result)
        print(f"wrote {args.out}", flush=True)
    return 0


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="training step time by plan mode (median after warm-up)")
    for col in ("mode", "step s", "predicted s", "prediction error", "vs adaptive", "final loss"):
        t.add_column(col, justify="right")
    ad = result["modes"]["adaptive"]["median_step_s"]
    for name, m in result["modes"].items():
        t.add_row(name, f"{m['median_step_s']:.3f}", f"{m['median_predicted_s']:.3f}",
                  f"{m['prediction_error_median']:.1%}", f"{m['median_step_s'] / ad:.2f}x", f"{m['final_loss']:.4f}")
    Console().print(t)
    s = result["summary"]
    extra = "".join(f"  vs {name} {s[key]:.2f}x" for name, key in (("BatchAda", "speedup_vs_batchada"),
                                                                    ("dp", "speedup_vs_dp")) if s[key] is not None)
    print(f"adaptive {s['adaptive_step_s']:.3f}s  best static (SP={s['static_degree']}) {s['static_step_s']:.3f}s  "
          f"speedup vs static {s['speedup_vs_static']:.2f}x (predicted {s['predicted_speedup_vs_static']:.2f}x){extra}  "
          f"prediction error median {s['prediction_error_median']:.1%}")
    for name, key in (("best static", "paired_vs_static"), ("BatchAda", "paired_vs_batchada")):
        if s.get(key):
            p = s[key]
            where = (f", {p['median_ratio_where_plans_differ']:.2f}x on the {p['plans_differ']} where the plans differ"
                     if p["plans_differ"] else "")
            print(f"same batches, {name} / adaptive: median {p['median_ratio']:.3f}x (95% CI {p['median_ratio_ci95'][0]:.3f}-"
                  f"{p['median_ratio_ci95'][1]:.3f}) over {p['batches']} batches{where}; total time "
                  f"{p['throughput_ratio']:.3f}x")
    if s.get("prediction_error_median_uncalibrated") is not None:
        print(f"online calibration: prediction error median {s['prediction_error_median']:.1%} calibrated, "
              f"{s['prediction_error_median_uncalibrated']:.1%} with the configured coefficients on the same steps")


if __name__ == "__main__":
    raise SystemExit(main())
