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
