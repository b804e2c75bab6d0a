"""`pliant rl --config configs/rl-local.yaml`: one RL post-training run on Ray (a local
cluster, or the running one under `ray job submit -- pliant rl ...` with
resources.ray_address: auto), with a progress line per step and metrics in
RUN_DIR/metrics.jsonl, the run's summary in RUN_DIR/summary.json."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from pliant.config import RLJobConfig, load_config, merge_config, parse_config
from pliant.io import atomic_write_text, strict_dumps

RL_CONFIG = "configs/rl-local.yaml"


def rl_config(names: list[str], **overrides) -> RLJobConfig:
    cfg = load_config(names, RLJobConfig)
    rl = {k: v for k, v in overrides.items() if v is not None}
    if not rl:
        return cfg
    return parse_config(merge_config(cfg.model_dump(), {"rl": rl}), "command line", RLJobConfig)


def add_rl_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=["sync", "async"], default=None, help="override rl.mode")
    p.add_argument("--staleness", type=int, default=None, help="override rl.staleness (async)")
    p.add_argument("--steps", type=int, default=None, help="override rl.steps")
    p.add_argument("--seed", type=int, default=None, help="override rl.seed")


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def groups(mix: dict) -> str:
    """{size: count} as '3x1 + 1x2' (count x group size)."""
    return " + ".join(f"{n}x{size}" for size, n in sorted(mix.items(), key=lambda kv: int(kv[0]))) or "-"


def held_out(summary: dict) -> str:
    return f"{fmt(summary['eval_reward_before'])} -> {fmt(summary['eval_reward_after'])}"


def cmd_rl(args: argparse.Namespace) -> int:
    from rich.console import Console

    from pliant.rl import runner

    cfg = rl_config(args.config, mode=args.mode, staleness=args.staleness, steps=args.steps, seed=args.seed)
    run_dir = Path(args.run_dir)
    console = Console(stderr=True)
    totals = {"tokens": 0, "samples": 0, "t0": None}

    def on_step(row: dict) -> None:
        if totals["t0"] is None:  # rates over the RL steps (not Ray's start or the warm start)
            totals["t0"] = row["wall"] - row["seconds"]
        totals["tokens"] += row["tokens"]
        totals["samples"] += row["samples"]
        el = max(time.time() - totals["t0"], 1e-9)
        reward = fmt(row["reward"])
        console.print(f"step {row['step'] + 1:>4}/{cfg.rl.steps}  reward {reward}  "
                      f"{totals['tokens'] / el:7.0f} tok/s  {totals['samples'] / el:6.1f} samples/s  "
                      f"staleness <= {row['max_staleness']}  queue {row['queue_held']}  kl {row['kl']:.4f}  "
                      f"SP groups {groups(row['group_mix'])}", soft_wrap=True)

    result = runner.run(cfg, run_dir, sft_cache=run_dir / "warm_start.pt", on_step=on_step, resume=args.resume)
    summary = result.summary()
    atomic_write_text(run_dir / "summary.json", strict_dumps(summary, indent=1))
    console.print(f"{summary['mode']} (k={summary['staleness']}): {summary['tokens_per_s']:.0f} trained tokens/s, "
                  f"{summary['samples_per_s']:.1f} samples/s, training reward {fmt(summary['reward_first'])} -> "
                  f"{fmt(summary['reward_last'])}, held-out reward {held_out(summary)}; rollout idle "
                  f"{summary['rollout_idle_fraction']:.0%}, learner idle {summary['learner_idle_fraction']:.0%}; "
                  f"learner of {summary['learner_world']} rank(s), SP groups {groups(summary['group_sizes'])}; "
                  f"wrote {run_dir / 'summary.json'}", soft_wrap=True)
    if result.learner.get("checkpoint"):
        ckpt = Path(result.learner["checkpoint"])
        console.print(f"the trained policy: {ckpt} (pliant export --run-dir {run_dir} --step "
                      f"{result.learner['checkpoint_step']} --out DIR writes it as a Hugging Face model directory)",
                      soft_wrap=True)
    return 0
