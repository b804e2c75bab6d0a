"""Fast heuristic for one micro-batch: target-makespan group sizing plus list scheduling.

Why it works: a sequence's device-time, s x (its time in a group of s), grows with s
(communication), so every sequence wants the smallest group that holds it; only a
sequence that alone would exceed the makespan target needs a larger group. For a target T
the heuristic therefore (1) gives each such long sequence the smallest group size that
finishes it within T, sharing groups best-fit, (2) covers the remaining ranks with groups
of one, and (3) list-schedules the short sequences, earliest finish first. It sweeps T
between the lower bound and the no-target answer and keeps the best makespan, rearranges
the best targets' SP groups onto fewer devices (a bin-packing step that sizing each long
sequence on its own misses), and improves the best schedules with local search. Its answer
is the MILP's warm start and the fallback when the MILP's time runs out.
"""
from __future__ import annotations

import time

import numpy as np

from .cost import CostModel
from .layout import place_groups
from .schedule import SeqTable, WorkGroup, improve, list_schedule, new_groups, priced_ms


def long_groups(table: SeqTable, cost: CostModel, target_ms: float
                ) -> tuple[list[WorkGroup], list[int]] | None:
    """Groups for the sequences that need SP to finish within the target, and the others.

    Each such sequence gets the smallest size that finishes it within the target (its
    fastest if none does) and joins, best-fit, an SP group of at least that size it still
    fits under the target, or opens one. None if the groups exceed the cluster or its nodes."""
    cap = target_ms - cost.beta_ms
    world, per_node = cost.world_size, cost.devices_per_node
    within = np.isfinite(table.t) & (table.t <= cap)
    need = np.where(within.any(axis=1), within.argmax(axis=1), table.t.argmin(axis=1))
    if not np.isfinite(table.t[np.arange(len(table)), need]).all():
        return None
    order = table.order
    sizes = np.asarray(table.sizes)[need[order]]
    short = order[sizes == 1].tolist()
    groups: list[WorkGroup] = []
    used = 0
    for j, c in zip(order[sizes > 1].tolist(), need[order[sizes > 1]].tolist()):
        s = table.sizes[c]
        row = table.t_rows[j]
        best, best_load = None, -1.0
        for g in groups:
            if g.size >= s:
                load = g.load + row[g.col]
                if load <= cap and load > best_load and g.can_hold(j, table, cost):
                    best, best_load = g, load
        if best is None:
            if used + s > world:
                return None
            best = WorkGroup(s, c)
            groups.append(best)
            used += s
        best.add(j, table)
    if place_groups([g.size for g in groups], world, per_node) is None:
        return None
    return groups, short


def repack(table: SeqTable, cost: CostModel, keep: list[WorkGroup], seeds: list[WorkGroup], items: list[int],
           cap: float, tightest: bool) -> list[WorkGroup] | None:
    """The kept SP groups as they are, plus the seed groups with `items` packed into them under
    the cap, longest first, best fit (`tightest`) or worst fit (spreading the longest first).
    An item no seed holds runs on one device if it finishes there within the cap (the caller
    schedules it with the short sequences); otherwise it opens the smallest group that finishes
    it within the cap, which later items may join. None if that exceeds the cluster or its nodes."""
    world, per_node = cost.world_size, cost.devices_per_node
    one = table.col.get(1)
    packed = [WorkGroup(g.size, g.col, list(g.seqs), g.load, g.used) for g in seeds]
    for j in sorted(items, key=lambda j: -table.lengths[j]):
        row = table.t_rows[j]
        fit = [g for g in packed if g.load + row[g.col] <= cap and g.can_hold(j, table, cost)]
        if fit:
            (max if tightest else min)(fit, key=lambda g: g.load + row[g.col]).add(j, table)
            continue
        if one is not None and row[one] <= cap:
            continue  # a short sequence at this cap
        cols = [c for c, s in enumerate(table.sizes) if s > 1 and row[c] <= cap]
        if not cols:
            return None
        g = WorkGroup(table.sizes[cols[0]], cols[0])
        if not g.can_hold(j, table, cost):
            return None
        g.add(j, table)
        packed.append(g)
    groups = keep + packed
    if sum(g.size for g in groups) > world or place_groups([g.size for g in groups], world, per_node) is None:
        return None
    return groups


def merges(table: SeqTable, cost: CostModel, long: list[WorkGroup], cap: float, max_merged: int = 4,
           until: float = np.inf) -> list[list[WorkGroup]]:
    """Rearrangements of the SP groups that free devices, a bin-packing step the target sweep
    cannot take (it sizes each long sequence on its own):

    - an SP group freed, the smallest first until one succeeds: its sequences and those of the
      SP groups at least as large packed again into the larger ones (best fit, then worst fit);
    - several SP groups of one size merged into one larger group that still saves devices
      (three groups of four into one of eight), up to `max_merged` of them, those whose longest
      sequences are shortest first; the sequences that no longer fit go to one device or to a
      new smallest group.

    Each is a list of SP groups on fewer devices (the short sequences are the others); those
    found by `until` (a perf_counter time)."""
    out = []
    devices = sum(g.size for g in long)
    for a in sorted(long, key=lambda g: (g.size, g.load)):
        hosts = [g for g in long if g is not a and g.size >= a.size]
        if not hosts:
            continue
        if time.perf_counter() > until:
            return out
        rest = [g for g in long if g is not a and g not in hosts]
        items = [j for g in hosts + [a] for j in g.seqs]
        seeds = [WorkGroup(g.size, g.col) for g in hosts]
        for tightest in (True, False):
            found = repack(table, cost, rest, seeds, items, cap, tightest)
            if found is not None and sum(g.size for g in found) < devices:
                break
        else:
            continue
        out.append(found)
        break
    by_size: dict[int, list[WorkGroup]] = {}
    for g in long:
        by_size.setdefault(g.size, []).append(g)
    for s, same in by_size.items():
        if len(same) < 2:
            continue
        heads = [(int(g.seqs[np.argmax(table.lengths[g.seqs])]), g) for g in same]  # each group's longest
        heads.sort(key=lambda x: table.lengths[x[0]])
        for m in range(2, min(len(heads), max_merged) + 1):
            # the smallest size that saves devices and finishes the m longest sequences within the cap
            rows = [j for j, _ in heads[:m]]
            fits = [b for b in table.sizes if s < b < m * s and table.t[rows, table.col[b]].sum() <= cap]
            if not fits:
                continue
            if time.perf_counter() > until:
                return out
            merged = [g for _, g in heads[:m]]
            rest = [g for g in long if all(g is not x for x in merged)]
            found = repack(table, cost, rest, [WorkGroup(fits[0], table.col[fits[0]])],
                           [j for g in merged for j in g.seqs], cap, True)
            if found is not None and sum(g.size for g in found) < devices:
                out.append(found)
    return out


def complete(table: SeqTable, cost: CostModel, long: list[WorkGroup], short: list[int], cap: float,
             fill_large: bool) -> list[WorkGroup] | None:
    """Cover the free ranks with groups of one and list-schedule the short sequences.

    With `fill_large`, the SP groups' room under the cap goes first to the longest short
    sequences that fit it: a sequence's device-time in a group of s, s x t_s, exceeds its
    time on one device by the communication, which weighs less the longer it is."""
    groups = [WorkGroup(g.size, g.col, list(g.seqs), g.load, g.used) for g in long]
    if fill_large and groups and np.isfinite(cap):
        rest = []
        # a short sequence's least time in any SP group present, to skip it in O(1) when no room is that large
        fastest = table.t[short][:, sorted({g.col for g in groups})].min(axis=1).tolist()
        room = max(cap - g.load for g in groups)
        for j, quickest in zip(short, fastest):
            if quickest > room:
                rest.append(j)
                continue
            row = table.t_rows[j]
            best, best_load = None, -1.0
            for g in groups:
                load = g.load + row[g.col]
                if load <= cap and load > best_load and g.can_hold(j, table, cost):
                    best, best_load = g, load
            if best is None:
                rest.append(j)
            else:
                best.add(j, table)
                room = max(cap - g.load for g in groups)
        short = rest
    groups += new_groups(table, [1] * (cost.world_size - sum(g.size for g in groups)))
    if not list_schedule(short, groups, table, cost):
        return None
    return groups


def solve_heuristic(table: SeqTable, cost: CostModel, deadline: float, steps: int = 14, refine: int = 4,
                    breakpoints: int = 12, keep: int = 2, levels: int = 4, finish: int = 2,
                    sweep_share: float = 0.6, done: dict | None = None) -> tuple[list[WorkGroup], float] | None:
    """Best schedule found over a sweep of makespan targets, locally improved.

    1. Targets climb geometrically from the micro-batch's lower bound (0.1%, doubling) and stop
       once one passes the best makespan found (a looser target only lets long sequences take
       smaller groups and finish later); the configuration changes only where some sequence's
       time in some size meets the cap, so those breakpoints are tried too (thinned evenly to
       `breakpoints`); then the best target's neighbourhood is bisected. Targets that give SP
       groups already completed are not completed again.
    2. The `keep` best targets are completed a second way, SP groups filled first (`complete`),
       and with their SP groups rearranged onto fewer devices (`merges`); the best configuration
       is filled to `levels` levels between the bound and its makespan.
    3. The `keep` best schedules of each phase get local search (`improve`) without its pair
       exchanges, and the `finish` best of those with them: the best raw schedule is not always
       the best after it, and the exchanges cost most.

    Phases 1 and 2 stop at `sweep_share` of the time to the deadline, so that a search cut
    short still gets its local search.

    `done` carries completions from one call to the next (the planner's second family meets
    most of the configurations the first one met: a completion depends only on the SP
    groups, the short sequences and the cap, not on which sizes were allowed).

    Every choice depends on the costs only, never on the clock, so a table always gives the
    same schedule; the deadline only cuts the search short, an attempt before it would pass."""
    if len(table) == 0:
        return [], 0.0
    lower = micro_batch_lower_bound(table, cost)
    found: list[tuple[float, float, list[WorkGroup]]] = []  # (makespan, target, groups), best first
    done = {} if done is None else done  # completion key -> (makespan, [(size, sequences)]) or None
    part_id = hash(table.ids.tobytes())
    seen: set[tuple] = set()
    merged: dict[tuple, list[list[WorkGroup]]] = {}
    slowest = 0.0

    def rebuild(spec: list[tuple[int, list[int]]]) -> list[WorkGroup]:
        groups = []
        for size, seqs in spec:
            g = WorkGroup(size, table.col[size])
            for j in seqs:
                g.add(j, table)
            groups.append(g)
        return groups

    def record(ms: float, target: float, groups: list[WorkGroup]) -> None:
        if all(abs(ms - other[0]) > 1e-9 for other in found):
            found.append((ms, target, groups))
            found.sort(key=lambda x: x[0])

    # the sweep and its second ways stop in time to leave the local search a share of the time
    sweep_end = time.perf_counter() + sweep_share * max(0.0, deadline - time.perf_counter())

    def time_left() -> bool:  # and not yet proven optimal: at the bound
        return time.perf_counter() + slowest <= sweep_end and found[0][0] > lower * (1 + 1e-9)

    def attempt(target: float, fill: bool = False, merge: bool = False, level: float | None = None) -> None:
        """Complete the SP groups the target gives (and with `merge` their rearrangements); the
        slowest completion so far, with what led to it, is the guard against passing the deadline."""
        nonlocal slowest
        t0 = time.perf_counter()
        part = long_groups(table, cost, target)
        if part is not None:
            cap = target - cost.beta_ms if level is None else level
            configs = [part[0]]
            if merge:
                # merging aims below the best makespan found: the SP groups' loads must stay under it;
                # the same for both ways of filling, so made once
                merge_cap = found[0][0] - cost.beta_ms
                mkey = (tuple((g.size, tuple(g.seqs)) for g in part[0]), merge_cap)
                if mkey not in merged:
                    merged[mkey] = merges(table, cost, part[0], merge_cap, until=sweep_end)
                configs += merged[mkey]
            for sp in configs:
                # filling depends on the cap
                key = (part_id, tuple((g.size, tuple(g.seqs)) for g in sp), (fill, cap if fill else None))
                if key in seen:
                    continue
                if key in done:  # completed by an earlier call: rebuild it only if it would rank
                    seen.add(key)
                    hit = done[key]
                    if hit is not None and (len(found) < keep or hit[0] < found[keep - 1][0]):
                        record(hit[0], target, rebuild(hit[1]))
                    continue
                # a merge attempt completes several; the first completion of all always runs
                if found and time.perf_counter() + slowest > sweep_end:
                    break
                seen.add(key)
                short = part[1] if sp is part[0] else _others(table, sp)
                groups = complete(table, cost, sp, short, cap, fill)
                if groups is not None:
                    ms = priced_ms(groups, cost)
                    record(ms, target, groups)
                done[key] = None if groups is None else (ms, [(g.size, list(g.seqs)) for g in groups])
                slowest = max(slowest, time.perf_counter() - t0)
                t0 = time.perf_counter()

    attempt(np.inf)
    if not found:
        return None
    tried = []
    for i in range(steps):
        target = lower * (1 + 0.001 * (2 ** i - 1))
        if target > found[0][0] or not time_left():
            break
        tried.append(target)
        attempt(target)
    points = cost.beta_ms + table.t[np.isfinite(table.t)]
    points = np.unique(points[(points >= lower) & (points < found[0][0])])
    if len(points) > breakpoints:
        points = points[np.linspace(0, len(points) - 1, breakpoints).round().astype(int)]
    for target in points.tolist():
        if not time_left():
            break
        tried.append(target)
        attempt(target)
    tried.sort()
    centre = found[0][1]
    if np.isfinite(centre):
        k = tried.index(centre)
        lo = tried[k - 1] if k > 0 else centre
        hi = tried[k + 1] if k + 1 < len(tried) else min(found[0][0], centre * 1.002)
        for _ in range(refine):
            if not time_left():
                break
            centre = found[0][1]
            lo, hi = (lo + centre) / 2, (centre + hi) / 2
            attempt(lo)
            attempt(hi)
    for _, target, _ in found[:keep]:
        if np.isfinite(target) and time_left():
            attempt(target, fill=True)
    polish = list(found[:keep])
    # second ways to complete the best configurations: a small SP group merged into the larger
    # ones, and the SP groups filled to levels between the bound and the best makespan
    for _, target, _ in found[:keep]:
        if np.isfinite(target) and time_left():
            attempt(target, fill=False, merge=True)
            attempt(target, fill=True, merge=True)
    best_target = found[0][1]
    if np.isfinite(best_target):
        for level in np.linspace(lower, found[0][0], levels + 2)[1:-1].tolist():
            if not time_left():
                break
            attempt(best_target, fill=True, level=level - cost.beta_ms)
    # local search on the best few of each phase: the best raw schedule is not always the best
    # after it, and a phase's candidates never push out the earlier phase's
    polish += [f for f in found[:keep] if all(f is not p for p in polish)]
    polished = []
    for _, _, groups in polish:
        improve(groups, table, cost, deadline, exchange=False)  # returns at once past the deadline
        polished.append((priced_ms(groups, cost), groups))
    # the exchanges of sequence pairs (finer balance, dearer) on the `finish` best only
    polished.sort(key=lambda x: x[0])
    for i, (_, groups) in enumerate(polished[:finish]):
        improve(groups, table, cost, deadline)
        polished[i] = (priced_ms(groups, cost), groups)
    ms, groups = min(polished, key=lambda x: x[0])
    return groups, ms


def _others(table: SeqTable, groups: list[WorkGroup]) -> list[int]:
    """The sequences in none of the groups, longest first."""
    placed = np.zeros(len(table), dtype=bool)
    for g in groups:
        placed[g.seqs] = True
    return [j for j in table.order.tolist() if not placed[j]]


def micro_batch_lower_bound(table: SeqTable, cost: CostModel, micro_batches: int = 1) -> float:
    """The cost model's lower bound (`CostModel.lower_bound_ms`) for this table's sequences
    and sizes, from the costs the table already holds where the devices are dedicated."""
    if cost.cores is not None and cost.cores < cost.world_size:
        return cost.lower_bound_ms(table.lengths, table.sizes, micro_batches)
    return micro_batches * cost.beta_ms + table.bound_ms

