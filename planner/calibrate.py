"""Online calibration of the cost model from measured group times.

The runtime measures every micro-batch: each busy SP group's forward + backward time. A
group of size s holding sequences of padded lengths L_j is predicted (planner/cost.py) as

    beta + n * gamma + a1 * sum L_j^2 / s + a2 * sum L_j / s + comm(L, s)

so every measured group time is one linear equation in the coefficients
(beta, gamma, a1, a2, comm scale). `Calibration` keeps a window of recent groups and refits
the coefficients by non-negative least squares, made robust by Huber reweighting (a few
stragglers or a slow first step do not drag the fit) and bounded (a refit moves each
coefficient by at most `max_step` x, and never beyond `max_drift` x of the configured value),
so that plans and predictions follow the machine the job actually runs on.

Which coefficients a window can tell apart depends on what it holds: the planner balances its
groups, so groups of one often hold similar token counts, and then beta and a2 (and gamma,
through the sequence count) are nearly collinear; a free fit would trade one against the
other until both hit their bounds. So the fit moves coefficients together in `TIES`, from the
finest tie the window conditions well (every term free) down to one scale for all, and keeps
the finest whose design has a condition number under `max_condition`. Every refit is returned
as a `Refit` record for the run's log, with the tie it used.
"""
from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from .cost import CostModel

TERMS = ("beta_ms", "gamma_ms", "a1_ms", "a2_ms", "comm_scale")

# ways to tie the terms' multipliers, finest first: each is a list of groups of TERMS moving together
TIES: list[tuple[str, list[tuple[str, ...]]]] = [
    ("each", [(t,) for t in TERMS]),
    ("beta, compute, comm", [("beta_ms",), ("gamma_ms", "a1_ms", "a2_ms"), ("comm_scale",)]),
    ("beta, compute+comm", [("beta_ms",), ("gamma_ms", "a1_ms", "a2_ms", "comm_scale")]),
    ("all", [TERMS]),
]


@dataclass(frozen=True)
class GroupSample:
    """One busy group of one micro-batch: its size, its sequences' lengths, its measured time."""

    size: int
    lengths: tuple[int, ...]
    measured_ms: float


@dataclass
class Refit:
    """What one refit changed, for the run's log (calibration.jsonl)."""

    step: int
    samples: int
    before: dict[str, float]
    after: dict[str, float]
    error_before: float  # median |predicted - measured| / measured over the window, old coefficients
    error_after: float
    clamped: list[str] = field(default_factory=list)  # coefficients held back by the bounds
    tie: str = "each"  # which terms moved together (TIES): the finest the window conditioned well
    condition: float | None = None  # that tie's condition number on the window

    def to_dict(self) -> dict:
        return asdict(self)


def features(cost: CostModel, size: int, lengths) -> np.ndarray:
    """The group's prediction as a linear form in TERMS: [1, n, sum L^2 / s, sum L / s, comm ms at scale 1]."""
    L = cost.padded(np.asarray(lengths, dtype=np.int64), size)
    comm = cost.group_comm_ms(L, size) / cost.comm_scale
    return np.array([1.0, float(len(L)), float((L * L).sum()) / size, float(L.sum()) / size, comm])


def price_micro_batches(micro_batches, cost: CostModel) -> float:
    """ms of micro-batches given as lists of busy groups (size, lengths), priced by `cost`."""
    return sum(cost.micro_batch_ms([(s, cost.group_ms(np.asarray(L, dtype=np.int64), s))
                                    for s, L in groups]) for groups in micro_batches)


def price_plan(plan, lengths, cost: CostModel) -> float:
    """A plan's step time in ms as `cost` prices it (its micro-batches and the step overhead)."""
    mbs = [[(g.size, [int(lengths[j]) for j in g.seq_ids]) for g in mb.groups if g.seq_ids]
           for mb in plan.micro_batches]
    return price_micro_batches(mbs, cost) + cost.step_overhead_ms


def coefficients(cost: CostModel) -> np.ndarray:
    return np.array([getattr(cost, t) for t in TERMS], dtype=np.float64)


def nnls_fit(A: np.ndarray, b: np.ndarray, weights: np.ndarray | None = None,
             required: Sequence[int] = ()) -> tuple[np.ndarray, float]:
    """Non-negative least squares for a handful of unknowns: the best least-squares solution
    over every support (2^k small solves), keeping only non-negative ones. Exact (the NNLS
    optimum is the unconstrained optimum on its support), no scipy. Rows are weighted by
    `weights`; columns in `required` must be in the support (a ValueError when no non-negative
    solution has them). Returns (x, weighted residual norm)."""
    w = np.ones(len(b)) if weights is None else np.asarray(weights, dtype=np.float64)
    Aw, bw = A * w[:, None], b * w
    k = A.shape[1]
    need = set(required)
    # the empty support (x = 0) is always feasible, unless some column is required
    best: tuple[np.ndarray, float] | None = None if need else (np.zeros(k), float(np.linalg.norm(bw)))
    for r in range(1, k + 1):
        for support in itertools.combinations(range(k), r):
            if not need <= set(support):
                continue
            cols = list(support)
            sol, *_ = np.linalg.lstsq(Aw[:, cols], bw, rcond=None)
            if (sol < 0).any():
                continue
            x = np.zeros(k)
            x[cols] = sol
            res = float(np.linalg.norm(Aw @ x - bw))
            if best is None or res < best[1] - 1e-12:
                best = (x, res)
    if best is None:
        raise ValueError("nnls_small: no non-negative solution contains the required columns")
    return best


def nnls_small(A: np.ndarray, b: np.ndarray, weights: np.ndarray | None = None,
               required: Sequence[int] = ()) -> np.ndarray:
    """`nnls_fit`'s solution alone."""
    return nnls_fit(A, b, weights, required)[0]


class Calibration:
    """A window of measured groups and the refit of the cost model's coefficients."""

    def __init__(self, cost: CostModel, window: int = 256, min_samples: int = 8, max_step: float = 2.0,
                 max_drift: float = 8.0, huber: float = 1.5, iterations: int = 5, prior: float = 0.1,
                 max_condition: float = 10.0, max_uncertainty: float = 0.25):
        self.max_condition, self.max_uncertainty = max_condition, max_uncertainty
        self.configured = cost
        self.cost = cost
        self.samples: deque[tuple[np.ndarray, float]] = deque(maxlen=window)
        self.min_samples, self.max_step, self.max_drift = min_samples, max_step, max_drift
        self.huber, self.iterations, self.prior = huber, iterations, prior
        self.steps: deque[tuple[list[list[tuple[int, tuple[int, ...]]]], float]] = deque(maxlen=max(8, window // 8))

    def observe(self, groups: list[GroupSample]) -> None:
        for g in groups:
            if g.measured_ms > 0 and g.lengths:
                self.samples.append((features(self.cost, g.size, g.lengths), float(g.measured_ms)))

    def observe_step(self, micro_batches: list[list[GroupSample]], step_ms: float, fit_last: bool = False) -> None:
        """A whole step: its micro-batches' busy groups and the step's measured time. The
        groups refit the coefficients (those of the last micro-batch only with `fit_last`: its
        backward also carries the step's gradient reduction); the step refits the time
        outside the micro-batches (`step_overhead_ms`)."""
        for i, groups in enumerate(micro_batches):
            if fit_last or i < len(micro_batches) - 1 or len(micro_batches) == 1:
                self.observe(groups)
        self.steps.append(([[(g.size, g.lengths) for g in groups] for groups in micro_batches], float(step_ms)))

    def _step_overhead(self, cost: CostModel) -> float | None:
        """Median of measured step time minus the micro-batches as `cost` prices them."""
        if not self.steps:
            return None
        return max(0.0, float(np.median([step_ms - price_micro_batches(mbs, cost) for mbs, step_ms in self.steps])))

    def _tie(self, scaled: np.ndarray, y: np.ndarray) -> tuple[str, np.ndarray, float]:
        """The finest tie of the terms the window determines: (name, terms x groups map,
        condition number). A tie's multipliers are uncertain by about its condition number
        times the window's noise (the relative scatter of the measured times that even the
        freest fit leaves), so the finest tie with condition <= max_condition and
        condition x noise <= max_uncertainty wins: on a quiet machine the terms come apart, on
        a noisy one (ranks sharing cores) they move together. Columns that are all zero (a term
        the model does not use) drop out."""
        used = [i for i in range(len(TERMS)) if np.any(scaled[:, i] > 0)]
        free = scaled[:, used] / y[:, None]  # the freest fit's relative residuals: what no price explains
        r = free @ nnls_small(free, np.ones(len(y))) - 1.0
        noise = 1.4826 * float(np.median(np.abs(r - np.median(r)))) * np.sqrt(len(y) / max(1, len(y) - len(used)))
        fallback = None
        for name, groups in TIES:
            M = np.zeros((len(TERMS), len(groups)))
            for g, members in enumerate(groups):
                for t in members:
                    if TERMS.index(t) in used:
                        M[TERMS.index(t), g] = 1.0
            M = M[:, M.sum(axis=0) > 0]
            G = (scaled @ M) / y[:, None]  # relative rows
            norms = np.linalg.norm(G, axis=0)
            if G.shape[1] == 0 or np.any(norms == 0):
                continue
            cond = float(np.linalg.cond(G / norms))
            if cond <= self.max_condition and cond * noise <= self.max_uncertainty:
                return name, M, cond
            fallback = (name, M, cond)
        assert fallback is not None
        return fallback

    def _fit(self, A: np.ndarray, y: np.ndarray, current: np.ndarray) -> tuple[np.ndarray, str, float]:
        """Relative NNLS (each equation divided by its measured time: errors are relative) with
        Huber weights; the unknowns are multipliers of the current coefficients, tied in groups
        (`_tie`), so a term whose coefficient is 0 stays 0 and the scales are comparable."""
        scaled = A * np.where(current > 0, current, 0.0)[None, :]
        name, M, cond = self._tie(scaled, y)
        G = scaled @ M
        w = np.ones(len(y))
        mult = np.ones(A.shape[1])
        # a weak pull of each tied group toward the configured values: where the window says
        # little (beta against compute when groups hold similar token counts) the configured
        # ratio holds; where it says much, the data win
        base = coefficients(self.configured)
        ratio = np.where(current > 0, base / np.where(current > 0, current, 1.0), 1.0)
        anchor = np.array([float(np.median(ratio[M[:, g] > 0])) for g in range(M.shape[1])])
        prior = np.sqrt(self.prior) * np.eye(M.shape[1])
        for _ in range(self.iterations):
            rows = np.sqrt(w)[:, None] / y[:, None]
            x = nnls_small(np.vstack([G * rows, prior]),
                           np.concatenate([np.ones(len(y)) * np.sqrt(w), np.sqrt(self.prior) * anchor]))
            mult = np.where(M.sum(axis=1) > 0, M @ x, 1.0)
            r = (scaled @ mult - y) / y
            scale = 1.4826 * np.median(np.abs(r - np.median(r))) or 1e-12
            u = np.abs(r) / (self.huber * scale)
            w = np.where(u <= 1, 1.0, 1.0 / np.maximum(u, 1e-12))
        return current * mult, name, cond

    def refit(self, step: int) -> Refit | None:
        """Refit from the window; None until it holds `min_samples` groups."""
        if len(self.samples) < self.min_samples:
            return None
        A = np.stack([f for f, _ in self.samples])
        y = np.array([m for _, m in self.samples])
        current = coefficients(self.cost)
        target, tie, cond = self._fit(A, y, current)
        base = coefficients(self.configured)
        lo = np.maximum(current / self.max_step, base / self.max_drift)
        hi = np.minimum(current * self.max_step, base * self.max_drift)
        new = np.clip(target, lo, hi)
        clamped = [t for t, a, b in zip(TERMS, new, target) if not np.isclose(a, b, rtol=1e-9, atol=0)]
        before = {**dict(zip(TERMS, current.tolist())), "step_overhead_ms": self.cost.step_overhead_ms}
        err = lambda c: float(np.median(np.abs(A @ c - y) / y))  # noqa: E731
        if err(new) > err(current):  # the bounds cut the fit short of anything better: keep what there is
            new, clamped = current, clamped + ["rejected: no better on the window"]
        cost = replace(self.cost, **{t: float(v) for t, v in zip(TERMS, new)})
        overhead = self._step_overhead(cost)
        if overhead is not None:
            cost = replace(cost, step_overhead_ms=overhead)
        self.cost = cost
        return Refit(step=step, samples=len(y), before=before,
                     after={**dict(zip(TERMS, new.tolist())), "step_overhead_ms": cost.step_overhead_ms},
                     error_before=err(current), error_after=err(new), clamped=clamped, tie=tie, condition=cond)
