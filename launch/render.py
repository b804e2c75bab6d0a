"""Readable tables of plans for the terminal (rich)."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from pliant.planner.baselines import Baselines
from pliant.planner.plan import GroupPlan, Plan

GIB = 2**30


def _rows(groups: list[GroupPlan], lengths: list[int]):
    """Group rows; consecutive groups of one are folded into a single row."""
    run: list[GroupPlan] = []

    def flush():
        if not run:
            return None
        ids = [i for g in run for i in g.seq_ids]
        first, last = run[0].start, run[-1].start
        row = (f"{first}-{last}" if len(run) > 1 else f"{first}", f"1 x{len(run)}" if len(run) > 1 else "1", "-",
               str(len(ids)), f"{sum(g.tokens for g in run):,}", f"{max((lengths[i] for i in ids), default=0):,}",
               f"{max(g.predicted_ms for g in run):,.0f}", f"{max(g.peak_memory_bytes for g in run) / GIB:.1f}")
        run.clear()
        return row

    for g in groups:
        if g.size == 1:
            run.append(g)
            continue
        row = flush()
        if row:
            yield row
        yield (f"{g.start}-{g.start + g.size - 1}", str(g.size), g.softmax_sp, str(len(g.seq_ids)), f"{g.tokens:,}",
               f"{max((lengths[i] for i in g.seq_ids), default=0):,}", f"{g.predicted_ms:,.0f}",
               f"{g.peak_memory_bytes / GIB:.1f}")
    row = flush()
    if row:
        yield row


def print_plan(plan: Plan, base: Baselines | None = None, console: Console | None = None) -> None:
    console = console or Console()
    n_tok = sum(plan.lengths)
    console.print(f"[bold]{plan.strategy} plan[/bold]: {len(plan.lengths)} sequences, {n_tok:,} tokens "
                  f"(longest {max(plan.lengths):,}) on {plan.world_size} devices "
                  f"({plan.world_size // plan.devices_per_node} x {plan.devices_per_node})")
    for m, mb in enumerate(plan.micro_batches):
        t = Table(title=f"micro-batch {m}: {mb.predicted_ms / 1e3:.3f} s predicted", title_justify="left")
        for col in ("ranks", "size", "softmax SP", "seqs", "tokens", "longest", "time ms", "peak GiB"):
            t.add_column(col, justify="right" if col not in ("ranks", "softmax SP") else "left")
        for row in _rows(mb.groups, plan.lengths):
            t.add_row(*row)
        console.print(t)
        st = mb.stats
        gap = f", gap to MILP bound {st.gap:.2%}" if st.gap is not None else ""
        console.print(f"  solver: answer from {st.source}, MILP {st.status}, {st.solve_s:.2f} s{gap}")
    console.print(f"predicted step time [bold]{plan.predicted_ms / 1e3:.3f} s[/bold]; lower bound "
                  f"{plan.lower_bound_ms / 1e3:.3f} s (+{plan.gap_to_lower_bound:.1%}); planned in {plan.solve_s:.2f} s")
    if base is not None:
        parts = [f"static SP={base.static_degree}: "
                 + (f"{base.static_ms / 1e3:.3f} s ({base.static_ms / plan.predicted_ms:.2f}x)"
                    if base.static_ms else "infeasible"),
                 f"BatchAda SP={base.batchada_degree}: {base.batchada_ms / 1e3:.3f} s "
                 f"({base.batchada_ms / plan.predicted_ms:.2f}x)"]
        if base.no_sp_ms is not None:
            parts.append(f"no SP: {base.no_sp_ms / 1e3:.3f} s ({base.no_sp_ms / plan.predicted_ms:.2f}x)")
        console.print("baselines (speedup of adaptive): " + "; ".join(parts))
