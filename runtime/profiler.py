"""Measuring the cost model's coefficients on the machine the job runs on.

Every rank takes part in every measurement at the same time, as in training (on a shared
CPU the ranks compete for cores, on a GPU node for the NICs), and a measurement's time is
the slowest rank's, the median over repeats after a warm-up:

* packs: forward + backward of the real model on packs of sequences in groups that tile the
  ranks (size 1 for compute; every planned size > 1 to check the comm terms);
* collectives: all-to-all and all-gather over the same tilings at a few message sizes; a
  line through them gives each group size's bandwidth (slope) and latency (intercept);
* activation memory: the bytes autograd saves for backward, per token.

The compute coefficients come from a non-negative least-squares fit, weighted by relative
error, of every pack's time against the cost model's own form (with the comm terms priced
at the measured bandwidths), so the planner predicts with exactly what was fitted.
"""
from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from pliant.comm import GroupRegistry, SPGroup
from pliant.planner.calibrate import nnls_small
from pliant.planner.cost import CostModel
from pliant.planner.plan import SPForm

from .model import lm_loss_sum
from .packing import shard_pack


@dataclass
class PackTiming:
    size: int  # SP group size
    lengths: list[int]
    ms: float  # forward + backward, slowest rank, median over repeats
    fitted_ms: float | None = None


@dataclass
class CollectiveTiming:
    op: str  # "all_to_all" or "all_gather"
    size: int
    bytes_moved: int  # per device: sent by all-to-all, received by all-gather (the cost model's convention)
    ms: float


@dataclass
class LinkFit:
    op: str
    size: int
    gbps: float
    latency_ms: float


@dataclass
class ComputeFit:
    """Coefficients of the cost model's compute form, per the model as it is (a1_eff_ms is the
    quadratic coefficient already scaled by the fraction of softmax layers)."""

    a1_eff_ms: float
    a2_ms: float
    gamma_ms: float
    beta_ms: float
    median_rel_error: float
    max_rel_error: float


@dataclass
class ProfileResult:
    packs: list[PackTiming]
    collectives: list[CollectiveTiming]
    links: list[LinkFit]
    compute: ComputeFit
    activation_bytes_per_token: float
    step_overhead_ms: float | None = None
    steps: list[dict] = field(default_factory=list)  # the calibration steps: measured vs predicted

    def to_dict(self) -> dict:
        return asdict(self)


def tiling(world: int, per_node: int, size: int) -> list[tuple[int, int]]:
    """Groups of `size` laid side by side from rank 0 the way the planner may place them
    (inside a node, or whole nodes); ranks left over stay idle."""
    if size <= per_node:
        return [(n * per_node + k * size, size) for n in range(world // per_node) for k in range(per_node // size)]
    return [(start, size) for start in range(0, world - size + 1, size)]


def my_group(registry: GroupRegistry, world: int, per_node: int, size: int, rank: int) -> SPGroup | None:
    for start, s in tiling(world, per_node, size):
        if start <= rank < start + s:
            return registry.get(start, s)
    return None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def slowest_rank_ms(fn: Callable[[], None], repeats: int, warmup: int, device: torch.device) -> float:
    """Median over repeats of the slowest rank's time for fn (every rank calls this)."""
    times = []
    for i in range(warmup + repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        _synchronize(device)
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if i >= warmup:
            times.append(float(t.item()) * 1e3)
    return statistics.median(times)


def time_packs(model: torch.nn.Module, registry: GroupRegistry, cases: Sequence[tuple[int, list[int]]], per_node: int,
               device: torch.device, form_of: Callable[..., SPForm], repeats: int = 3, warmup: int = 1,
               seed: int = 0) -> list[PackTiming]:
    """Forward + backward time of each (group size, lengths) case, all groups of the tiling busy,
    each group running the SP form a plan would give it (`form_of(size, lengths)`: the cost
    model's `sp_form`, so the timing and the pricing it is fitted with agree)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(seed)
    vocab = model.vocab_size
    out = []
    for size, lengths in cases:
        group = my_group(registry, world, per_node, size, rank)
        seqs = [torch.randint(0, vocab, (L,), generator=gen) for L in lengths]

        def step() -> None:
            if group is None:
                return
            pack = shard_pack(seqs, group, device, form_of(size, np.asarray(lengths)))
            lm_loss_sum(model(pack.tokens, pack.ctx), pack.targets).backward()
            model.zero_grad(set_to_none=True)

        out.append(PackTiming(size, list(lengths), slowest_rank_ms(step, repeats, warmup, device)))
    return out


def time_collectives(registry: GroupRegistry, sizes: Sequence[int], message_bytes: Sequence[int], per_node: int,
                     device: torch.device, repeats: int = 5, warmup: int = 1) -> list[CollectiveTiming]:
    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    for size in sizes:
        group = my_group(registry, world, per_node, size, rank)
        for nbytes in message_bytes:
            n = max(size, nbytes // 4 // size * size)  # float32 elements, divisible by the group size
            x = torch.ones(n, dtype=torch.float32, device=device)
            a2a_out, ag_out = torch.empty_like(x), torch.empty(n * size, dtype=torch.float32, device=device)

            def a2a() -> None:
                if group is not None:
                    dist.all_to_all_single(a2a_out, x, group=group.pg)

            def ag() -> None:
                if group is not None:
                    dist.all_gather_into_tensor(ag_out, x, group=group.pg)

            out.append(CollectiveTiming("all_to_all", size, n * 4 * (size - 1) // size,
                                        slowest_rank_ms(a2a, repeats, warmup, device)))
            out.append(CollectiveTiming("all_gather", size, n * 4 * (size - 1),
                                        slowest_rank_ms(ag, repeats, warmup, device)))
    return out


def fit_links(timings: Sequence[CollectiveTiming]) -> list[LinkFit]:
    """ms = latency + bytes / bandwidth for each (op, size), non-negative least squares."""
    out = []
    for (op, size), rows in itertools.groupby(sorted(timings, key=lambda t: (t.op, t.size, t.bytes_moved)),
                                              key=lambda t: (t.op, t.size)):
        rows = list(rows)
        A = np.array([[1.0, float(r.bytes_moved)] for r in rows])
        y = np.array([r.ms for r in rows])
        lat, per_byte = nnls_small(A, y, weights=1.0 / y)
        if per_byte <= 0:  # flat in bytes over the measured range: use the largest message's average
            per_byte = max(r.ms / r.bytes_moved for r in rows)
        out.append(LinkFit(op, size, gbps=1e-6 / per_byte, latency_ms=float(lat)))
    return out


def pack_features(cost: CostModel, lengths: Sequence[int], size: int) -> tuple[np.ndarray, float]:
    """([sum L^2/s, sum L/s, sequences, 1], comm ms) of a pack in the cost model's form."""
    L = cost.padded(np.asarray(lengths), size)
    comm = cost.group_comm_ms(np.asarray(lengths), size)
    return np.array([float((L * L).sum()) / size, float(L.sum()) / size, float(len(L)), 1.0]), comm


def fit_compute(packs: list[PackTiming], cost: CostModel, quadratic: bool = True) -> ComputeFit:
    """a1_eff, a2, gamma, beta from the pack timings; fills each pack's fitted_ms."""
    rows, targets = [], []
    for p in packs:
        feats, comm = pack_features(cost, p.lengths, p.size)
        rows.append(feats if quadratic else feats * np.array([0.0, 1.0, 1.0, 1.0]))
        targets.append(p.ms - comm)
    A, y = np.array(rows), np.array(targets)
    meas = np.array([p.ms for p in packs])
    x = nnls_small(A, y, weights=1.0 / meas, required=[1])
    rel = []
    for p, feats, target in zip(packs, A, y):
        p.fitted_ms = float(feats @ x + (p.ms - target))
        rel.append(abs(p.fitted_ms - p.ms) / p.ms)
    return ComputeFit(a1_eff_ms=float(x[0]), a2_ms=float(x[1]), gamma_ms=float(x[2]), beta_ms=float(x[3]),
                      median_rel_error=float(np.median(rel)), max_rel_error=float(np.max(rel)))


class SavedBytes:
    """Bytes autograd keeps for backward while the context is open (each storage once)."""

    def __init__(self) -> None:
        self.bytes = 0
        self._seen: set[int] = set()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += storage.nbytes()
        return t

    def __enter__(self) -> "SavedBytes":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def activation_bytes_per_token(model: torch.nn.Module, group: SPGroup, device: torch.device, lengths: Sequence[int] = (256, 1024)
                               ) -> float:
    """Slope of saved-for-backward bytes over tokens, in a group of one; parameters (saved
    by reference, the same at every length) cancel out."""
    vocab = model.vocab_size
    counts = []
    for L in lengths:
        seq = torch.randint(0, vocab, (L,))
        pack = shard_pack([seq], group, device)
        with SavedBytes() as saved:
            loss = lm_loss_sum(model(pack.tokens, pack.ctx), pack.targets)
        counts.append(saved.bytes)
        del loss
    return float(counts[-1] - counts[0]) / float(lengths[-1] - lengths[0])
