"""Sequence-length sources: real length files, an empirical Wikipedia histogram, and
synthetic long-tail distributions (lognormal body + Pareto tail), plus the token-budget
batcher that cuts a document stream into global batches.

Real corpora have power-law tails (docs/architecture.md: a lognormal fit of the Wikipedia lengths
underestimates the tail 6-30x above 32K), so the synthetic generator splices a Pareto
tail onto a lognormal body at a threshold, with the tail's share of sequences given.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from .errors import PlanningError


class LengthSource(Protocol):
    name: str

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray: ...


@dataclass(frozen=True)
class LongTailDistribution:
    """Lognormal body below `tail_start`, Pareto(alpha) tail above it, `tail_fraction` of
    the sequences in the tail. Lengths are integers >= `min_len`."""

    name: str
    body_median: float
    body_sigma: float
    tail_start: float
    tail_alpha: float
    tail_fraction: float
    min_len: int = 1

    def __post_init__(self) -> None:
        for key in ("body_median", "body_sigma", "tail_start", "tail_alpha"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{self.name}: {key} must be > 0, got {getattr(self, key)}")
        if not 0 <= self.tail_fraction < 1:
            raise ValueError(f"{self.name}: tail_fraction must be in [0, 1), got {self.tail_fraction}")

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        in_tail = rng.random(n) < self.tail_fraction
        out = np.empty(n)
        # body: lognormal truncated to [min_len, tail_start), by redrawing what falls outside
        body = np.flatnonzero(~in_tail)
        while len(body):
            x = rng.lognormal(math.log(self.body_median), self.body_sigma, len(body))
            ok = (x >= self.min_len) & (x < self.tail_start)
            out[body[ok]] = x[ok]
            body = body[~ok]
        # tail: Pareto with scale tail_start
        n_tail = int(in_tail.sum())
        out[in_tail] = self.tail_start * (1.0 - rng.random(n_tail)) ** (-1.0 / self.tail_alpha)
        return np.maximum(np.floor(out), self.min_len).astype(np.int64)


@dataclass(frozen=True)
class HistogramDistribution:
    """Empirical distribution stored as counts over log-spaced bins [edges[i], edges[i+1])."""

    name: str
    edges: tuple[int, ...]
    counts: tuple[int, ...]

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        counts = np.asarray(self.counts, dtype=np.float64)
        edges = np.asarray(self.edges, dtype=np.float64)
        b = rng.choice(len(counts), size=n, p=counts / counts.sum())
        lo, hi = np.log(edges[b]), np.log(edges[b + 1])
        x = np.exp(lo + (hi - lo) * rng.random(n))
        return np.clip(np.floor(x), edges[b], edges[b + 1] - 1).astype(np.int64)


@dataclass(frozen=True)
class EmpiricalLengths:
    """A real length file: documents drawn without replacement, reshuffled each epoch."""

    name: str
    lengths: np.ndarray

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return self.lengths[rng.integers(0, len(self.lengths), n)]

    def stream(self, rng: np.random.Generator) -> Iterator[int]:
        while True:
            for i in rng.permutation(len(self.lengths)):
                yield int(self.lengths[i])


# ----- fitting and presets -----

def fit_long_tail(lengths: np.ndarray, name: str, tail_quantile: float = 0.99) -> LongTailDistribution:
    """Fit body (lognormal, by quantile matching below the threshold) and tail (Hill estimator)."""
    x = np.sort(np.asarray(lengths, dtype=np.float64))
    start = float(np.quantile(x, tail_quantile))
    tail = x[x >= start]
    alpha = len(tail) / float(np.log(tail / start).sum())
    body = np.log(x[x < start])
    median = float(np.exp(np.median(body)))
    # sigma from the interquartile range of the (truncated) body: robust to the cut
    q1, q3 = np.quantile(body, [0.25, 0.75])
    sigma = float((q3 - q1) / 1.3489795)
    return LongTailDistribution(name, median, sigma, start, alpha, float(len(tail) / len(x)), int(x[0]))


def build_histogram(lengths: np.ndarray, name: str, bins_per_decade: int = 40) -> HistogramDistribution:
    x = np.asarray(lengths)
    top = int(x.max()) + 1
    n_bins = int(math.ceil(math.log10(top) * bins_per_decade))
    edges = np.unique(np.round(np.logspace(0, math.log10(top), n_bins + 1)).astype(np.int64))
    edges[-1] = max(edges[-1], top)
    counts, _ = np.histogram(x, bins=edges)
    return HistogramDistribution(name, tuple(int(e) for e in edges), tuple(int(c) for c in counts))


def _preset_file() -> dict:
    text = resources.files("pliant.planner").joinpath("presets/lengths.json").read_text()
    return json.loads(text)


def presets() -> dict[str, LengthSource]:
    raw = _preset_file()
    out: dict[str, LengthSource] = {}
    for name, spec in raw["long_tail"].items():
        out[name] = LongTailDistribution(name=name, **{k: v for k, v in spec.items() if k != "note"})
    for name, spec in raw["histogram"].items():
        out[name] = HistogramDistribution(name, tuple(spec["edges"]), tuple(spec["counts"]))
    return out


def get_distribution(name: str) -> LengthSource:
    table = presets()
    if name not in table:
        raise PlanningError(f"unknown length distribution {name!r}; known: {', '.join(sorted(table))}")
    return table[name]


def load_length_file(path: str | Path) -> EmpiricalLengths:
    """One positive integer per line. Errors name the file and the offending line."""
    path = Path(path)
    if not path.is_file():
        raise PlanningError(f"length file {path} does not exist")
    text = path.read_text()
    try:
        values = np.array(text.split(), dtype=np.int64)
    except ValueError:
        for no, line in enumerate(text.splitlines(), 1):
            for tok in line.split():
                try:
                    int(tok)
                except ValueError:
                    raise PlanningError(
                        f"length file {path}, line {no}: {tok!r} is not an integer (one length per line)"
                    ) from None
        raise
    if len(text.splitlines()) != len(values):
        for no, line in enumerate(text.splitlines(), 1):
            if len(line.split()) != 1:
                raise PlanningError(f"length file {path}, line {no}: expected one integer, got {line!r}")
    if len(values) == 0:
        raise PlanningError(f"length file {path} holds no lengths")
    bad = np.flatnonzero(values <= 0)
    if len(bad):
        i = int(bad[0])
        raise PlanningError(f"length file {path}, line {i + 1}: length {values[i]} is not positive")
    return EmpiricalLengths(name=path.name, lengths=values)


def resolve_source(lengths_file: str | Path | None, dist: str | None) -> LengthSource:
    if (lengths_file is None) == (dist is None):
        raise PlanningError("give exactly one of a length file (--lengths) or a distribution name (--dist)")
    return load_length_file(lengths_file) if lengths_file is not None else get_distribution(dist)  # type: ignore[arg-type]


def document_stream(source: LengthSource, rng: np.random.Generator, chunk: int = 4096) -> Iterator[int]:
    if isinstance(source, EmpiricalLengths):
        yield from source.stream(rng)
        return
    while True:
        yield from (int(x) for x in source.sample(chunk, rng))


def token_batches(source: LengthSource, batch_tokens: int, max_len: int | None, seed: int) -> Iterator[np.ndarray]:
    """Global batches of whole documents: fill up to `batch_tokens`; a document that would
    overflow starts the next batch (as a packing data loader does). Documents longer than
    `max_len` are truncated to it."""
    if batch_tokens <= 0:
        raise PlanningError(f"batch_tokens must be positive, got {batch_tokens}")
    if max_len is not None and max_len <= 0:
        raise PlanningError(f"max_len must be positive, got {max_len}")
    rng = np.random.default_rng(seed)
    pending: list[int] = []
    total = 0
    for doc in document_stream(source, rng):
        if max_len is not None:
            doc = min(doc, max_len)
        if pending and total + doc > batch_tokens:
            yield np.array(pending, dtype=np.int64)
            pending, total = [], 0
        pending.append(doc)
        total += doc


def describe(lengths: np.ndarray) -> dict[str, float]:
    x = np.asarray(lengths, dtype=np.float64)
    q = np.quantile(x, [0.5, 0.9, 0.99, 0.999])
    return {"n": float(len(x)), "tokens": float(x.sum()), "mean": float(x.mean()), "median": float(q[0]),
            "p90": float(q[1]), "p99": float(q[2]), "p999": float(q[3]), "max": float(x.max())}


def preset_record(dist: LongTailDistribution) -> dict:
    d = asdict(dist)
    d.pop("name")
    return d
