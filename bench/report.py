"""`pliant report RUN_DIR`: PNG plots of a training run from its metrics.jsonl: loss, measured
against predicted step time, and the SP group sizes over time."""
from __future__ import annotations

import json
from pathlib import Path

from pliant.planner.errors import PlanningError


def load_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PlanningError(f"{path} does not exist: is {run_dir} a pliant run directory?")
    rows = []
    for no, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise PlanningError(f"{path}, line {no}: not a JSON object") from None
    if not rows:
        raise PlanningError(f"{path} holds no steps")
    # a resumed run appends: keep the last record of each step
    by_step = {r["step"]: r for r in rows}
    return [by_step[s] for s in sorted(by_step)]


def render(run_dir: Path, out: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load_metrics(run_dir)
    out = Path(out) if out else Path(run_dir) / "report.png"
    steps = [r["step"] for r in rows]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    ax1.plot(steps, [r["loss"] for r in rows], lw=1, label="loss")
    window = max(1, len(rows) // 20)
    if window > 1:
        smooth = [sum(r["loss"] for r in rows[max(0, i - window + 1):i + 1]) / len(rows[max(0, i - window + 1):i + 1])
                  for i in range(len(rows))]
        ax1.plot(steps, smooth, lw=2, label=f"mean of {window}")
    ax1.set_ylabel("next-token loss")
    ax1.legend()
    ax1.set_title(f"training run {Path(run_dir).name}")
    ax2.plot(steps, [r["seconds"] for r in rows], lw=1, label="measured")
    ax2.plot(steps, [r["predicted_s"] for r in rows], lw=1, label="predicted by the plan")
    ax2.set_ylabel("step time (s)")
    ax2.legend()
    sizes = sorted({int(s) for r in rows for s in r["group_mix"]})
    bottom = [0.0] * len(rows)
    cmap = plt.get_cmap("viridis", max(len(sizes), 2))
    for i, s in enumerate(sizes):
        devices = [r["group_mix"].get(str(s), 0) * s for r in rows]
        ax3.bar(steps, devices, bottom=bottom, width=1.0, color=cmap(i), label=f"SP={s}")
        bottom = [b + d for b, d in zip(bottom, devices)]
    ax3.set_ylabel("devices in groups of each size")
    ax3.set_xlabel("step")
    ax3.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def is_rl(rows: list[dict]) -> bool:
    return "staleness_bound" in rows[0]


def rl_label(row: dict) -> str:
    return "sync" if row["mode"] == "sync" else f"async k={row['staleness_bound']}"


def render_rl(run_dirs: list[Path], out: Path) -> Path:
    """RL runs (`pliant rl`, `pliant bench rl`): the training reward per step against wall
    time and against samples trained, one colour per mode, one line per run (mean of the
    last 3 steps); a mode with 3 or more runs (seeds) also gets its median over runs, step by
    step, as a thick line."""
    import statistics

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    curves: dict[str, list[tuple[list[float], list[float], list[float]]]] = {}
    for run_dir in run_dirs:
        every = load_metrics(run_dir)
        if not is_rl(every):
            raise PlanningError(f"{run_dir}: not an RL run (its metrics have no staleness_bound)")
        t0 = every[0]["wall"] - every[0]["seconds"]
        samples, total = [], 0
        for r in every:
            total += r["samples"]
            samples.append(total)
        keep = [i for i, r in enumerate(every) if r["reward"] is not None]
        rows, samples = [every[i] for i in keep], [samples[i] for i in keep]
        if not rows:
            continue
        smooth = [sum(r["reward"] for r in rows[max(0, i - 2):i + 1]) / len(rows[max(0, i - 2):i + 1])
                  for i in range(len(rows))]
        curves.setdefault(rl_label(rows[0]), []).append(([r["wall"] - t0 for r in rows], samples, smooth))
    for n, (label, runs) in enumerate(curves.items()):
        colour, many = f"C{n}", len(runs) >= 3
        for i, (wall, samples, smooth) in enumerate(runs):
            kw = {"color": colour, "lw": 0.8 if many else 1.3, "alpha": 0.25 if many else 0.8,
                  "label": None if many or i else label}
            ax1.plot(wall, smooth, **kw)
            ax2.plot(samples, smooth, **kw)
        if many:
            steps = min(len(run[2]) for run in runs)
            med = [[statistics.median(run[j][i] for run in runs) for i in range(steps)] for j in range(3)]
            kw = {"color": colour, "lw": 2.4, "label": f"{label} (median of {len(runs)})"}
            ax1.plot(med[0], med[2], **kw)
            ax2.plot(med[1], med[2], **kw)
    ax1.set_xlabel("wall time (s)")
    ax2.set_xlabel("samples trained")
    ax1.set_ylabel("training reward (mean of 3 steps)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    ax1.set_title("reward against wall time")
    ax2.set_title("reward against samples")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def render_any(run_dirs: list[Path], out: Path | None = None) -> Path:
    """`pliant report`: a training run's plots, or the reward curves of one or more RL runs."""
    first = load_metrics(run_dirs[0])
    if is_rl(first):
        return render_rl(run_dirs, Path(out) if out else Path(run_dirs[0]) / "report.png")
    if len(run_dirs) > 1:
        raise PlanningError("pliant report takes several run directories only for RL runs")
    return render(run_dirs[0], out)
