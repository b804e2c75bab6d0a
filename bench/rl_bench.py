"""`pliant bench rl`: synchronous RL against asynchronous streaming RL with staleness bounds
k = 1 and 2, on the same task, model and Ray resources (the config's: on the local default,
the machine's 2 CPUs, one for rollout and one for the learner, torch threads pinned per
actor), over several seeds.

Every seed's modes start from the same warm-started policy (cached per seed) and train the
same number of steps on the same number of samples; the order of the modes rotates from seed
to seed so that a noisy machine slows them alike. Per run: trained tokens and samples per
second (wall time from the workers' start to the last step), idle fractions of rollout and
learner, the largest staleness of any trained sample, and the held-out reward before and
after RL. Medians over seeds, async / sync ratios, JSON, a table, and the reward curves
against wall time and against samples (`pliant report` on the runs' directories).

`--learner-world 1,2` runs every mode with each learner world at the same total learner
CPUs (`--learner-cpus`, default the config's world x CPUs per rank): W ranks of
learner_cpus / W CPUs and torch threads each, so W = 2 is the learner split into a process
group of two, not a learner given more of the machine. The summary reports each world's
medians and the W / W_first throughput ratio per mode (same seeds, same warm starts).
"""
from __future__ import annotations

import platform
import statistics
from pathlib import Path
from typing import Any

from pliant.io import strict_dumps

MODES: dict[str, tuple[str, int]] = {"sync": ("sync", 0), "async_k1": ("async", 1), "async_k2": ("async", 2)}


def _median(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def summarize(records: list[dict], eval_prompts: int | None = None) -> dict[str, Any]:
    """Medians per mode and the summary (async / sync ratios of the medians; per-seed ratios
    beside them). Learning: the held-out reward after RL (median over seeds), and its gain
    over the seed's warm start (after - before per seed, then the median: seeds start from
    different warm starts); `reward_eval_se`, the standard error of one held-out score of
    `eval_prompts` prompts, says what "within noise" means."""
    modes: dict[str, dict] = {}
    for name in MODES:
        runs = [r for r in records if r["name"] == name]
        if not runs:
            continue
        modes[name] = {key: _median(runs, key) for key in
                       ("tokens_per_s", "samples_per_s", "wall_s", "rollout_idle_fraction", "learner_idle_fraction",
                        "eval_reward_before", "eval_reward_after", "train_reward_last")}
        modes[name].update(seeds=len(runs), max_staleness=max(r["max_staleness"] for r in runs),
                           samples=runs[0]["samples"])
    if "sync" not in modes:
        raise ValueError(f"bench rl needs the sync baseline, got modes {sorted(modes)}")
    sync = modes["sync"]
    summary: dict[str, Any] = {"seeds": sync["seeds"], "samples_per_run": sync["samples"],
                               "max_staleness_observed": {n: m["max_staleness"] for n, m in modes.items()},
                               "reward_before": sync["eval_reward_before"], "reward_sync": sync["eval_reward_after"],
                               "train_reward_last_sync": sync["train_reward_last"]}
    by_seed = {(r["name"], r["seed"]): r for r in records}
    seeds = sorted({r["seed"] for r in records})

    def gains(name: str) -> list[float]:
        return [by_seed[(name, s)]["eval_reward_after"] - by_seed[(name, s)]["eval_reward_before"] for s in seeds
                if (name, s) in by_seed and by_seed[(name, s)].get("eval_reward_after") is not None]

    sync_gains = gains("sync")
    if sync_gains:
        summary["reward_gain_sync"] = statistics.median(sync_gains)
        summary["reward_gain_sync_per_seed"] = sync_gains
    if eval_prompts and sync["eval_reward_after"] is not None:
        p = sync["eval_reward_after"]
        summary["reward_eval_se"] = (p * (1 - p) / eval_prompts) ** 0.5
    for name in ("async_k1", "async_k2"):
        if name not in modes:
            continue
        k = name[-2:]
        m = modes[name]
        summary[f"throughput_ratio_{k}"] = m["tokens_per_s"] / sync["tokens_per_s"]
        summary[f"samples_ratio_{k}"] = m["samples_per_s"] / sync["samples_per_s"]
        summary[f"throughput_ratio_{k}_per_seed"] = [
            by_seed[(name, s)]["tokens_per_s"] / by_seed[("sync", s)]["tokens_per_s"]
            for s in seeds if (name, s) in by_seed and ("sync", s) in by_seed]
        summary[f"reward_async_{k}"] = m["eval_reward_after"]
        mode_gains = gains(name)
        if mode_gains:
            summary[f"reward_gain_async_{k}"] = statistics.median(mode_gains)
            summary[f"reward_gain_async_{k}_per_seed"] = mode_gains
        summary[f"train_reward_last_async_{k}"] = m["train_reward_last"]
    return {"modes": modes, "summary": summary}


def with_learner_world(cfg, world: int, learner_cpus: float):
    """`cfg` with a learner of `world` ranks sharing `learner_cpus` CPUs (Ray CPUs and torch
    threads per rank: learner_cpus / world), and a local cluster big enough for every worker."""
    from pliant.config import RLJobConfig, merge_config, parse_config

    res = cfg.resources
    per_rank = learner_cpus / world
    learner = {"world": world, "num_cpus": per_rank, "threads": max(1, round(per_rank))}
    need = res.rollout_workers * res.rollout.num_cpus + learner_cpus + res.reference.num_cpus + res.reward.num_cpus
    overlay: dict[str, Any] = {"resources": {"learner": learner}}
    if res.ray_address is None:
        overlay["resources"]["num_cpus"] = max(res.num_cpus or 0, int(-(-need // 1)))
    return parse_config(merge_config(cfg.model_dump(), overlay), f"learner world {world}", RLJobConfig)


def with_learner_plan(cfg, plan: str):
    """`cfg` with learner.plan = `plan` (static: the degree the config names, else the
    smallest that holds the task's longest sample)."""
    from pliant.config import RLJobConfig, merge_config, parse_config

    if plan not in LEARNER_PLANS:
        raise ValueError(f"learner plan {plan!r}: choose from {', '.join(LEARNER_PLANS)}")
    body = cfg.model_dump()
    if plan != "static":
        body["learner"]["static_degree"] = None
    return parse_config(merge_config(body, {"learner": {"plan": plan}}), f"learner plan {plan}", RLJobConfig)


LEARNER_PLANS = ("adaptive", "static", "uniform", "dp")


def run(cfg, out: Path, seeds: int, modes: list[str], last: int = 5, worlds: list[int] | None = None,
        learner_cpus: float | None = None, plans: list[str] | None = None) -> dict[str, Any]:
    """`last`: steps whose training reward is averaged into `train_reward_last`; `worlds`:
    learner worlds to run each mode with, at `learner_cpus` learner CPUs in all; `plans`:
    learner plans (learner.plan) to run each mode with, on the same seeds."""
    import ray

    from pliant.bench.report import render_rl
    from pliant.rl import runner

    res = cfg.resources
    learner_cpus = learner_cpus or res.learner.world * res.learner.num_cpus
    worlds = worlds or [res.learner.world]
    plans = plans or [cfg.learner.plan]

    def config_for(w: int, plan: str):
        c = with_learner_world(cfg, w, learner_cpus) if len(worlds) > 1 else cfg
        return with_learner_plan(c, plan) if len(plans) > 1 else c

    configs = {(w, p): config_for(w, p) for w in worlds for p in plans}
    runs_dir = out.parent / f"{out.stem}-runs"
    runner.ensure_ray(max(configs.values(), key=lambda c: c.resources.num_cpus or 0).resources)
    records = []
    try:
        for seed in range(seeds):
            order = modes[seed % len(modes):] + modes[:seed % len(modes)]
            plan_order = plans[seed % len(plans):] + plans[:seed % len(plans)]
            for w in worlds if seed % 2 == 0 else worlds[::-1]:
                for plan in plan_order:
                    for name in order:
                        mode, k = MODES[name]
                        tag = "".join([f"-w{w}" if len(worlds) > 1 else "", f"-{plan}" if len(plans) > 1 else ""])
                        run_dir = runs_dir / f"{name}{tag}-seed{seed}"
                        r = runner.run(configs[(w, plan)], run_dir, mode=mode, staleness=k, seed=seed,
                                       sft_cache=runs_dir / f"warm-start-seed{seed}.pt",
                                       checkpoints=False)  # throughput: no checkpoint writes in the runs measured
                        rewards = [s["reward"] for s in r.steps[-last:] if s["reward"] is not None]
                        rec = {"name": name, "learner_plan": plan, **r.summary(), "run_dir": str(run_dir),
                               "train_reward_last": sum(rewards) / len(rewards) if rewards else None,
                               "rollout": r.rollout, "reward_curve": [s["reward"] for s in r.steps],
                               "skipped": len(r.learner["skipped"]) + len(r.reward_worker["skipped"])}
                        records.append(rec)
                        step = rec["learner_step_s"]
                        print(f"  seed {seed} {name:9s} W={w} plan={plan:8s} {rec['tokens_per_s']:7.0f} tok/s "
                              f"{rec['samples_per_s']:6.1f} samples/s  learner step "
                              f"{'-' if step is None else f'{step:.3f}'} s  idle rollout "
                              f"{rec['rollout_idle_fraction']:.0%} learner {rec['learner_idle_fraction']:.0%}  "
                              f"staleness <= {rec['max_staleness']}  held-out reward {rec['eval_reward_before']} -> "
                              f"{rec['eval_reward_after']}", flush=True)
    finally:
        ray.shutdown()
    first = [r for r in records if r["learner_world"] == worlds[0] and r["learner_plan"] == plans[0]]
    body = {"config": cfg.model_dump(mode="json"), "host": {"machine": platform.machine(),
                                                             "python": platform.python_version()},
            "modes_run": modes, "runs": records}
    if "sync" in modes:
        body.update(summarize(first, cfg.rl.eval_prompts))
    if len(worlds) > 1:
        body["learner_worlds"] = by_world(records, worlds, learner_cpus, cfg.rl.eval_prompts)
    if len(plans) > 1:
        body["learner_plans"] = by_plan(records, plans)
    plot = out.with_suffix(".png")
    render_rl([Path(r["run_dir"]) for r in records], plot)
    body["plot"] = str(plot)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(strict_dumps(body, indent=1))
    print_table(body)
    return body


def by_world(records: list[dict], worlds: list[int], learner_cpus: float, eval_prompts: int) -> dict[str, Any]:
    """Each learner world's medians, and per mode the throughput of each world over the
    first's (medians of per-seed ratios beside the ratio of medians)."""
    out: dict[str, Any] = {"learner_cpus": learner_cpus, "worlds": {}}
    for w in worlds:
        out["worlds"][str(w)] = summarize([r for r in records if r["learner_world"] == w], eval_prompts)
    base = out["worlds"][str(worlds[0])]["modes"]
    by = {(r["name"], r["learner_world"], r["seed"]): r for r in records}
    ratios: dict[str, Any] = {}
    for w in worlds[1:]:
        for name, m in out["worlds"][str(w)]["modes"].items():
            per_seed = [by[(name, w, s)]["tokens_per_s"] / by[(name, worlds[0], s)]["tokens_per_s"]
                        for (n, ww, s) in by if n == name and ww == w and (name, worlds[0], s) in by]
            ratios[f"{name}_w{w}_over_w{worlds[0]}"] = {
                "tokens_per_s": m["tokens_per_s"] / base[name]["tokens_per_s"],
                "per_seed": per_seed, "median_per_seed": statistics.median(per_seed) if per_seed else None}
    out["throughput_ratios"] = ratios
    return out


def by_plan(records: list[dict], plans: list[str]) -> dict[str, Any]:
    """Per mode and learner plan: medians over seeds of the learner's step time (forward,
    backward, optimizer), trained tokens and samples per second and the idle fractions; which
    samples went to which SP group size (summed over seeds); and adaptive's ratios to every
    other plan (of the medians, and the median of the per-seed ratios)."""
    out: dict[str, Any] = {"plans": plans, "modes": {}}
    by = {(r["name"], r["learner_plan"], r["seed"]): r for r in records}
    for name in dict.fromkeys(r["name"] for r in records):
        per_plan: dict[str, Any] = {}
        for plan in plans:
            runs = [r for r in records if r["name"] == name and r["learner_plan"] == plan]
            if not runs:
                continue
            m = {key: _median(runs, key) for key in ("learner_step_s", "learner_train_s", "tokens_per_s", "samples_per_s",
                                                     "rollout_idle_fraction", "learner_idle_fraction",
                                                     "eval_reward_before", "eval_reward_after")}
            placed: dict[str, dict[str, int]] = {}
            for r in runs:
                for size, d in r.get("placement", {}).items():
                    t = placed.setdefault(size, {"samples": 0, "tokens": 0, "shortest": d["shortest"], "longest": 0})
                    t["samples"] += d["samples"]
                    t["tokens"] += d["tokens"]
                    t["shortest"], t["longest"] = min(t["shortest"], d["shortest"]), max(t["longest"], d["longest"])
            m["placement"] = dict(sorted(placed.items(), key=lambda kv: int(kv[0])))
            m["seeds"] = len(runs)
            per_plan[plan] = m
        ratios: dict[str, Any] = {}
        if "adaptive" in per_plan:
            ad = per_plan["adaptive"]
            for plan, m in per_plan.items():
                if plan == "adaptive":
                    continue
                seeds = [s for (n, p, s) in by if n == name and p == plan and (name, "adaptive", s) in by]
                tok = [by[(name, "adaptive", s)]["tokens_per_s"] / by[(name, plan, s)]["tokens_per_s"] for s in seeds]
                def per_seed(key: str) -> list[float]:
                    return [by[(name, plan, s)][key] / by[(name, "adaptive", s)][key] for s in seeds
                            if by[(name, plan, s)].get(key) and by[(name, "adaptive", s)].get(key)]

                step, busy = per_seed("learner_step_s"), per_seed("learner_train_s")
                ratios[f"adaptive_over_{plan}"] = {
                    "tokens_per_s": ad["tokens_per_s"] / m["tokens_per_s"] if ad["tokens_per_s"] and m["tokens_per_s"]
                    else None,
                    "learner_step_speedup": m["learner_step_s"] / ad["learner_step_s"]
                    if ad["learner_step_s"] and m["learner_step_s"] else None,
                    # the learner's whole time in forward, backward and optimizer over the run
                    "learner_time_speedup": m["learner_train_s"] / ad["learner_train_s"]
                    if ad.get("learner_train_s") and m.get("learner_train_s") else None,
                    "tokens_per_s_per_seed": tok, "learner_step_speedup_per_seed": step,
                    "learner_time_speedup_per_seed": busy,
                    "tokens_per_s_median_per_seed": statistics.median(tok) if tok else None,
                    "learner_step_speedup_median_per_seed": statistics.median(step) if step else None}
        out["modes"][name] = {"plans": per_plan, "ratios": ratios}
    return out


def print_plans(body: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    fmt = lambda v, spec=".2f": "-" if v is None else format(v, spec)  # noqa: E731
    plans = body["learner_plans"]
    for name, entry in plans["modes"].items():
        t = Table(title=f"{name}: the learner's plan (medians over seeds)")
        for col in ("learner plan", "learner step s", "x adaptive", "learner time s", "trained tok/s", "samples/s",
                    "rollout idle",
                    "learner idle", "held-out reward after", "samples by SP group size (lengths)"):
            t.add_column(col)
        ad = entry["plans"].get("adaptive", {}).get("learner_step_s")
        for plan, m in entry["plans"].items():
            where = ", ".join(f"{d['samples']} in {size} ({d['shortest']}-{d['longest']})"
                              for size, d in m["placement"].items()) or "-"
            t.add_row(plan, fmt(m["learner_step_s"], ".3f"),
                      fmt(m["learner_step_s"] / ad if ad and m["learner_step_s"] else None),
                      fmt(m.get("learner_train_s"), ".1f"),
                      fmt(m["tokens_per_s"], ".0f"), fmt(m["samples_per_s"], ".1f"),
                      fmt(m["rollout_idle_fraction"], ".0%"), fmt(m["learner_idle_fraction"], ".0%"),
                      fmt(m["eval_reward_after"], ".3f"), where)
        Console(width=200).print(t)
        for key, r in entry["ratios"].items():
            print(f"{name} {key.replace('_', ' ')}: learner step {fmt(r['learner_step_speedup'])}x (per seed "
                  f"{', '.join(fmt(x) for x in r['learner_step_speedup_per_seed'])}), whole run's learner time "
                  f"{fmt(r['learner_time_speedup'])}x (per seed "
                  f"{', '.join(fmt(x) for x in r['learner_time_speedup_per_seed'])}), trained tok/s "
                  f"{fmt(r['tokens_per_s'])}x (per seed {', '.join(fmt(x) for x in r['tokens_per_s_per_seed'])})")


def print_table(body: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    if body.get("learner_plans"):
        print_plans(body)
    if "modes" not in body:
        return
    fmt = lambda v, spec=".2f": "-" if v is None else format(v, spec)  # noqa: E731
    t = Table(title=f"RL: sync vs async (medians over {body['summary']['seeds']} seeds, "
                    f"{body['summary']['samples_per_run']} samples per run)")
    for col in ("mode", "trained tok/s", "samples/s", "x sync", "rollout idle", "learner idle", "max staleness",
                "held-out reward before", "after", "train reward, last 5 steps"):
        t.add_column(col)
    sync = body["modes"]["sync"]
    for name, m in body["modes"].items():
        t.add_row(name, fmt(m["tokens_per_s"], ".0f"), fmt(m["samples_per_s"], ".1f"),
                  fmt(m["tokens_per_s"] / sync["tokens_per_s"]), fmt(m["rollout_idle_fraction"], ".0%"),
                  fmt(m["learner_idle_fraction"], ".0%"), str(m["max_staleness"]), fmt(m["eval_reward_before"], ".3f"),
                  fmt(m["eval_reward_after"], ".3f"), fmt(m["train_reward_last"], ".3f"))
    Console(width=180).print(t)
    worlds = body.get("learner_worlds")
    if worlds:
        t = Table(title=f"learner worlds at {worlds['learner_cpus']:g} learner CPUs in all (medians over seeds)")
        for col in ("mode", *(f"W={w} tok/s" for w in worlds["worlds"]), "ratio (last / first)",
                    *(f"W={w} SP groups" for w in worlds["worlds"])):
            t.add_column(col)
        names = list(next(iter(worlds["worlds"].values()))["modes"])
        for name in names:
            cells = [fmt(worlds["worlds"][w]["modes"].get(name, {}).get("tokens_per_s"), ".0f")
                     for w in worlds["worlds"]]
            last = list(worlds["worlds"])[-1]
            ratio = worlds["throughput_ratios"].get(f"{name}_w{last}_over_w{list(worlds['worlds'])[0]}", {})
            groups = [", ".join(f"{n}x{size}" for size, n in
                                next((r["group_sizes"] for r in body["runs"]
                                      if r["name"] == name and str(r["learner_world"]) == w), {}).items()) or "-"
                      for w in worlds["worlds"]]
            t.add_row(name, *cells, fmt(ratio.get("tokens_per_s")), *groups)
        Console(width=180).print(t)
