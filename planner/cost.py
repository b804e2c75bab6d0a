"""The planner's cost model: the contract with the hardware (FlexSP form, docs/architecture.md).

For a sequence of L tokens in an SP group of s devices (L padded to a multiple of s):

* compute:  (a1 * f_softmax * L^2 + a2 * L) / s + gamma   ms, plus beta ms per group per
  micro-batch (gamma: the per-sequence overhead every rank of the group pays, 0 in FlexSP);
* softmax layers: Ulysses all-to-all when the head count divides by s (each device sends
  (s-1)/s of its L/s tokens' q, k, v, o activations and their gradients), otherwise LASP-2H
  (AllGather K, V forward, reduce-scatter dK, dV backward);
* linear layers: LASP-2, one AllGather of a (heads x dk x dv) float32 state per sequence
  forward and one of its gradient backward: size independent of L. Gated DeltaNet layers
  (the gated delta rule) gather each chunk's affine map of the state, (A, B): heads x dk x
  (dk + dv) forward, the entering state's gradient (heads x dk x dv) backward, plus the short
  convolution's halo (kernel - 1 rows per sequence); or, where the value heads divide by s,
  the head all-to-all (q, k, v, g, beta in, the output back, per token, as Megatron does),
  chosen per group, whichever moves its sequences faster;
* memory per device: activation bytes per token x tokens / s, model states by ZeRO stage,
  plus the gathered LASP-2 states and the LASP-2H K, V of one layer.

Times are in milliseconds, memory in bytes, bandwidth in GB/s = 1e9 bytes/s.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

from .plan import SOLO_FORM, SPForm
from .spec import GIB, ClusterSpec, CostSpec, ModelSpec, PlannerSpec

STATE_BYTES = 4  # LASP-2 memory states are accumulated and exchanged in float32


def model_state_bytes(params: float, dtype_bytes: int, zero_stage: int, world: int) -> float:
    """Bytes of weights, gradients and Adam states held by one device under ZeRO.

    Half precision keeps an fp32 master copy plus m and v (12 bytes/param, as in the ZeRO
    paper: 2+2+12 = 16); full precision keeps only m and v in its own dtype.
    """
    w = g = dtype_bytes
    k = 12 if dtype_bytes == 2 else 2 * dtype_bytes
    if zero_stage == 0:
        per_param = w + g + k
    elif zero_stage == 1:
        per_param = w + g + k / world
    elif zero_stage == 2:
        per_param = w + (g + k) / world
    else:
        per_param = (w + g + k) / world
    return params * per_param


def ulysses_fits(s: int, heads: int) -> bool:
    """Ulysses shards heads, so it needs s | heads; other sizes run softmax layers as LASP-2H."""
    return heads % s == 0


def sp_form(s: int, heads: int, linear_sp: str) -> SPForm:
    """How a group of s devices runs a model's layers: softmax layers as Ulysses when s divides
    the heads (it shards them), else LASP-2H (AllGather K, V); linear attention as `linear_sp`
    (a fixed form: CostModel.sp_form resolves the model's "auto" per group). The one place this
    is decided: the plan carries it, the runtime executes it."""
    if s == 1:
        return SOLO_FORM
    return SPForm("ulysses" if ulysses_fits(s, heads) else "lasp2h", linear_sp)


class BandwidthTable:
    """GB/s by group size: the entry of the smallest tabulated size >= s."""

    def __init__(self, by_size: dict[int, float] | None, intra: float | None, inter: float | None, node: int):
        self._sizes = sorted(by_size) if by_size else []
        self._gbps = [by_size[k] for k in self._sizes] if by_size else []
        self._intra, self._inter, self._node = intra, inter, node

    def gbps(self, s: int) -> float:
        if not self._sizes:
            return float(self._intra if s <= self._node else self._inter)
        i = bisect.bisect_left(self._sizes, s)
        return float(self._gbps[min(i, len(self._sizes) - 1)])


@dataclass(frozen=True)
class CostModel:
    a1_ms: float  # already scaled by the fraction of softmax layers
    a2_ms: float
    beta_ms: float
    act_bytes_per_token: float
    n_softmax: int
    n_linear: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int
    passes: int  # forward + backward (+ recomputed forward with activation checkpointing)
    model_state_bytes: float
    device_memory_bytes: float  # usable: device memory minus the configured reserve
    world_size: int
    devices_per_node: int
    a2a: BandwidthTable = field(repr=False, compare=False)
    all_gather: BandwidthTable = field(repr=False, compare=False)
    gamma_ms: float = 0.0  # per sequence, on every rank of its group
    step_overhead_ms: float = 0.0  # per step, outside the micro-batches; changes no plan
    cores: int | None = None  # CPU cores the ranks share (None: dedicated devices)
    comm_scale: float = 1.0  # measured / modelled communication time (planner/calibrate.py refits it)
    linear_form: str = "auto"  # the model's linear-attention SP operator (model.linear_sp)
    gated_delta: bool = False  # the linear layers are Gated DeltaNet's (model.linear_kind)
    linear_heads: int = 0  # linear layers' value heads, key heads, dims, convolution kernel (0: heads, head_dim)
    linear_key_heads: int = 0
    linear_dk: int = 0
    linear_dv: int = 0
    linear_conv: int = 0
    _mem_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_specs(cls, cluster: ClusterSpec, model: ModelSpec, cost: CostSpec, planner: PlannerSpec | None = None
                   ) -> "CostModel":
        planner = planner or PlannerSpec()
        bw = cluster.bandwidth
        node = cluster.devices_per_node
        a2a = BandwidthTable(bw.all_to_all_gbps, bw.intra_node_gbps, bw.inter_node_gbps, node)
        ag_table = bw.all_gather_gbps if bw.all_gather_gbps is not None else bw.all_to_all_gbps
        ag = BandwidthTable(ag_table, bw.intra_node_gbps, bw.inter_node_gbps, node)
        world = cluster.world_size
        return cls(
            a1_ms=cost.a1_ms * model.n_softmax / model.layers,
            a2_ms=cost.a2_ms,
            beta_ms=cost.beta_ms,
            act_bytes_per_token=cost.activation_bytes_per_token,
            n_softmax=model.n_softmax,
            n_linear=model.n_linear,
            heads=model.heads,
            kv_heads=model.kv_heads,
            head_dim=model.head_dim,
            dtype_bytes=model.dtype_bytes,
            passes=3 if model.activation_checkpointing else 2,
            model_state_bytes=model_state_bytes(model.param_count, model.dtype_bytes, model.zero_stage, world),
            device_memory_bytes=cluster.device_memory_gib * GIB - planner.memory_reserve_gib * GIB,
            world_size=world,
            devices_per_node=node,
            a2a=a2a,
            all_gather=ag,
            gamma_ms=cost.seq_overhead_ms,
            step_overhead_ms=cost.step_overhead_ms,
            cores=None if cluster.cores is None else cluster.cores * cluster.nodes,
            linear_form=model.linear_sp,
            gated_delta=model.linear_kind == "gated_delta",
            linear_heads=model.linear_v_heads,
            linear_key_heads=model.linear_k_heads,
            linear_dk=model.linear_dk,
            linear_dv=model.linear_dv,
            linear_conv=model.linear_conv,
        )

    def __post_init__(self) -> None:  # 0: the softmax layers' heads and head_dim
        for name, default in (("linear_heads", self.heads), ("linear_dk", self.head_dim),
                              ("linear_dv", self.head_dim), ("linear_key_heads", self.linear_heads or self.heads)):
            object.__setattr__(self, name, getattr(self, name) or default)

    # ----- per-sequence terms (vectorised over lengths) -----
    @staticmethod
    def padded(lengths: np.ndarray, s: int) -> np.ndarray:
        return -(-np.asarray(lengths, dtype=np.float64) // s) * s

    def uses_ulysses(self, s: int) -> bool:
        return ulysses_fits(s, self.heads)  # called per group size in the planner's pricing: no SPForm built

    def linear_forms(self, s: int) -> tuple[str, ...]:
        """The linear-attention forms a group of s may run (one unless the model says auto). The
        head all-to-all needs s to divide the value heads: other groups run LASP-2's gather."""
        if self.linear_form == "heads" and self.linear_heads % s:
            return ("lasp2",)
        if self.linear_form != "auto":
            return (self.linear_form,)
        if self.gated_delta and s > 1 and self.linear_heads % s == 0:
            return ("lasp2", "heads")
        return ("lasp2",)

    def sp_form(self, s: int, lengths: np.ndarray | None = None) -> SPForm:
        """The form of a group of s holding sequences of these lengths: for linear layers that
        may run either way, the form that moves the group's sequences faster (LASP-2 without
        lengths)."""
        forms = self.linear_forms(s)
        if len(forms) > 1 and lengths is not None and len(lengths):
            forms = (min(forms, key=lambda f: float(self.linear_comm_ms(lengths, s, f).sum())),)
        return sp_form(s, self.heads, forms[0])

    def compute_ms(self, lengths: np.ndarray, s: int) -> np.ndarray:
        L = self.padded(lengths, s)
        return (self.a1_ms * L * L + self.a2_ms * L) / s + self.gamma_ms

    def softmax_comm_bytes(self, lengths: np.ndarray, s: int) -> np.ndarray:
        """Bytes one device sends per step for the softmax layers of these sequences."""
        if s == 1 or self.n_softmax == 0:
            return np.zeros(np.shape(lengths))
        local = self.padded(lengths, s) / s
        if self.uses_ulysses(s):
            kv = max(self.kv_heads, s)  # GQA: kv heads are replicated up to the group size
            per_token = (2 * self.heads + 2 * kv) * self.head_dim * self.dtype_bytes
            return self.passes * self.n_softmax * local * (s - 1) / s * per_token
        per_token = 2 * self.kv_heads * self.head_dim * self.dtype_bytes
        return self.passes * self.n_softmax * local * (s - 1) * per_token

    def softmax_comm_ms(self, lengths: np.ndarray, s: int) -> np.ndarray:
        if s == 1:
            return np.zeros(np.shape(lengths))
        table = self.a2a if self.uses_ulysses(s) else self.all_gather
        return self.comm_scale * self.softmax_comm_bytes(lengths, s) / (table.gbps(s) * 1e9) * 1e3

    @property
    def linear_state_bytes(self) -> int:
        """What LASP-2 gathers per sequence per linear layer forward, float32: the memory state
        (heads x dk x dv), or for the gated delta rule the chunk's map (A, B): heads x dk x (dk + dv)."""
        width = self.linear_dk + self.linear_dv if self.gated_delta else self.linear_dv
        return self.linear_heads * self.linear_dk * width * STATE_BYTES

    @property
    def linear_grad_bytes(self) -> int:
        """What the backward gathers per sequence per linear layer: the entering state's gradient."""
        return self.linear_heads * self.linear_dk * self.linear_dv * STATE_BYTES

    @property
    def conv_halo_bytes(self) -> int:
        """The short convolution's halo of one rank's chunk of a sequence: kernel - 1 rows of the
        q, k, v channels (gathered forward, reduce-scattered backward)."""
        if not self.linear_conv:
            return 0
        channels = 2 * self.linear_key_heads * self.linear_dk + self.linear_heads * self.linear_dv
        return (self.linear_conv - 1) * channels * self.dtype_bytes

    def linear_comm_bytes(self, s: int, lengths: np.ndarray | None = None, form: str = "lasp2") -> np.ndarray | float:
        """Bytes one device moves per step for the linear layers of each sequence: LASP-2 (and
        the ring) independent of length; the head all-to-all (q, k, v, g, beta of its tokens
        out, the output back, forward and backward) proportional to it. Without lengths: one
        sequence of LASP-2."""
        if s == 1 or self.n_linear == 0:
            return 0.0 if lengths is None else np.zeros(np.shape(lengths))
        halo = (s - 1) * self.conv_halo_bytes * self.passes
        if form == "heads":  # q, k, v, beta in the model's dtype, the log decay g in float32; the output back
            local = self.padded(lengths, s) / s
            per_token = ((2 * self.linear_dk + 2 * self.linear_dv + 1) * self.dtype_bytes + STATE_BYTES) * self.linear_heads
            return self.n_linear * (self.passes * local * (s - 1) / s * per_token + halo)
        # LASP-2 gathers each chunk's state (pliant's linear attention) or map (the gated delta
        # rule); the ring passes a state (heads x dk x dv) rank to rank
        state = self.linear_grad_bytes if form == "ring" else self.linear_state_bytes
        fwd = (self.passes - 1) * state  # forward, and its recomputation with checkpointing
        per_seq = float(self.n_linear * ((s - 1) * (fwd + self.linear_grad_bytes) + halo))
        return per_seq if lengths is None else np.full(np.shape(lengths), per_seq)

    def linear_comm_ms(self, lengths: np.ndarray, s: int, form: str | None = None) -> np.ndarray:
        """ms per sequence for its linear layers in a group of s running `form` (default: the
        per-sequence best of the forms the group may run: what the planner's pricing uses)."""
        if s == 1 or self.n_linear == 0:
            return np.zeros(np.shape(lengths))
        forms = (form,) if form else self.linear_forms(s)
        tables = {"heads": self.a2a}
        times = [self.linear_comm_bytes(s, lengths, f) / (tables.get(f, self.all_gather).gbps(s) * 1e9) * 1e3
                 for f in forms]
        return self.comm_scale * np.minimum.reduce(times) if len(times) > 1 else self.comm_scale * times[0]

    def seq_ms(self, lengths: np.ndarray, s: int) -> np.ndarray:
        """Predicted time of each sequence in a group of s, group overhead excluded (linear
        layers at their per-sequence best form: a bound on what the group's one form costs)."""
        return self.compute_ms(lengths, s) + self.softmax_comm_ms(lengths, s) + self.linear_comm_ms(lengths, s)

    def group_comm_ms(self, lengths: np.ndarray, s: int) -> float:
        """Communication ms of a group of s holding these sequences, in the group's form."""
        form = self.sp_form(s, lengths).linear
        linear = self.linear_comm_ms(lengths, s, form if s > 1 else None)
        return float(self.softmax_comm_ms(lengths, s).sum() + linear.sum())

    def group_ms(self, lengths: np.ndarray, s: int) -> float:
        """Predicted time of a busy group of s holding these sequences (beta included), the
        group running the one form `sp_form(s, lengths)` gives it."""
        lengths = np.asarray(lengths)
        return self.beta_ms + float(self.compute_ms(lengths, s).sum()) + self.group_comm_ms(lengths, s)

    def single_device_ms(self, lengths: np.ndarray) -> np.ndarray:
        L = np.asarray(lengths, dtype=np.float64)
        return self.a1_ms * L * L + self.a2_ms * L + self.gamma_ms

    def micro_batch_ms(self, groups: list[tuple[int, float]]) -> float:
        """Time of a micro-batch from its busy groups' (size, ms).

        Dedicated devices: the slowest group. Ranks sharing fewer cores (`cores`): group times
        are measured with every rank busy, each rank holding cores/world of a core; a group
        whose neighbours are idle runs faster, up to a core per rank, while all groups together
        are bounded by the cores: max(slowest group at its best speed, total rank-time spread
        over all ranks)."""
        if not groups:
            return 0.0
        worst = max(ms for _, ms in groups)
        if self.cores is None or self.cores >= self.world_size:
            return worst
        share = self.cores / self.world_size
        alone = max(ms * share * max(1.0, s / self.cores) for s, ms in groups)
        spread = sum(s * ms for s, ms in groups) / self.world_size
        return max(alone, spread)

    # ----- memory -----
    def memory_coeffs(self, s: int) -> tuple[float, float, float]:
        """(base, per padded token, per sequence) bytes on one device of a group of s: model
        states; activations / s (plus one layer's gathered K, V under LASP-2H); the gathered
        LASP-2 states of every linear layer, kept for backward."""
        cached = self._mem_cache.get(s)
        if cached is None:
            per_token = self.act_bytes_per_token / s
            per_seq = 0.0
            if s > 1:  # every chunk's gathered state (map), kept for backward
                per_seq = float(self.n_linear * s * self.linear_state_bytes)
                if self.n_softmax and not self.uses_ulysses(s):
                    per_token += 2 * self.kv_heads * self.head_dim * self.dtype_bytes
            cached = self._mem_cache[s] = (self.model_state_bytes, per_token, per_seq)
        return cached

    def group_memory_bytes(self, tokens_padded: float, n_seqs: int, s: int) -> float:
        """Peak bytes on one device of a group of s holding packed sequences of these padded tokens."""
        base, per_token, per_seq = self.memory_coeffs(s)
        return base + per_token * tokens_padded + per_seq * n_seqs

    def fits(self, tokens_padded: float, n_seqs: int, s: int) -> bool:
        return self.group_memory_bytes(tokens_padded, n_seqs, s) <= self.device_memory_bytes

    def token_capacity(self, s: int) -> float:
        """Padded tokens a group of s can hold, ignoring the small per-sequence state terms."""
        base, per_token, _ = self.memory_coeffs(s)
        return max(0.0, (self.device_memory_bytes - base) / per_token)

    def seq_fits(self, lengths: np.ndarray, s: int) -> np.ndarray:
        """Whether each sequence alone fits a group of s."""
        base, per_token, per_seq = self.memory_coeffs(s)
        return base + per_token * self.padded(lengths, s) + per_seq <= self.device_memory_bytes

    def lower_bound_ms(self, lengths: np.ndarray, sizes: list[int] | None = None, micro_batches: int = 1) -> float:
        """A time no plan of these sequences can beat, with groups of `sizes` (default: every
        size) and at least `micro_batches` micro-batches.

        Dedicated devices: the optimum of the divisible relaxation, an LP solved exactly. Let C
        be the longest micro-batch's time less beta. Every sequence then runs in a group where
        its time is at most C, and the groups' device-time, s x (their load), fits in the N
        devices' C each. Relaxing which sequences share a group, the least device-time under the
        cap C is each sequence's own minimum over the sizes where it finishes within C,
        f(C) = sum_j min {s t_js : t_js <= C}, and every micro-batch pays beta once:

            total >= k beta + min over C of max(C, f(C) / N).

        f falls as C grows, so the minimum is where the two terms cross, found by bisection on
        the breakpoints t_js. It is at least the older two bounds, the slowest sequence's best
        time (the least feasible C) and the least device-time spread over N (f at C = inf), and
        binds where both are loose: one very long sequence has to take a large group to meet
        C, paying more device-time than its cheapest group would. Where the batch does not fit
        the devices' memory at once, `memory_bound` raises it: the longest micro-batch can do only
        a memory's worth of the device-time, and the rest adds to the other micro-batches.

        Shared CPU cores (`cores`): group times shrink when neighbours idle, so the slowest
        sequence's floor is priced as the cost model prices a group running alone, and the
        spread holds beta once per device of a busy group."""
        L = np.asarray(lengths, dtype=np.int64)
        if L.size == 0:
            return 0.0
        sizes = sizes or [1] + [s for s in range(2, self.world_size + 1)]
        k = max(1, int(micro_batches))
        t = np.stack([np.where(self.seq_fits(L, s), self.seq_ms(L, s), np.inf) for s in sizes], axis=1)
        device_time = t * np.asarray(sizes, dtype=np.float64)[None, :]
        if self.cores is not None and self.cores < self.world_size:
            share = self.cores / self.world_size
            scale = np.array([share * max(1.0, s / self.cores) for s in sizes])
            floor = float(((self.beta_ms + t) * scale[None, :]).min(axis=1).max())
            spread = float(device_time.min(axis=1).sum() / self.world_size)
            return max(floor, spread + k * self.beta_ms / self.world_size)
        per_device = np.stack([self.memory_coeffs(s)[1] * self.padded(L, s) + self.memory_coeffs(s)[2]
                               for s in sizes], axis=1) * np.asarray(sizes, dtype=np.float64)[None, :]
        mem = np.where(np.isfinite(t), per_device, np.inf).min(axis=1)  # a sequence's least bytes over its group
        room = self.device_memory_bytes - self.model_state_bytes
        return k * self.beta_ms + memory_bound(t, device_time, self.world_size, mem, room)

    def simple_bounds_ms(self, lengths: np.ndarray, sizes: list[int], micro_batches: int = 1) -> tuple[float, float]:
        """The two bounds the LP bound improves on, for reports: (the slowest sequence's best
        time on any group + beta per micro-batch, the least device-time / N + beta per micro-batch)."""
        L = np.asarray(lengths, dtype=np.int64)
        t = np.stack([np.where(self.seq_fits(L, s), self.seq_ms(L, s), np.inf) for s in sizes], axis=1)
        spread = float((t * np.asarray(sizes, dtype=np.float64)[None, :]).min(axis=1).sum() / self.world_size)
        k = max(1, int(micro_batches))
        return float(t.min(axis=1).max()) + k * self.beta_ms, spread + k * self.beta_ms


def memory_bound(t: np.ndarray, device_time: np.ndarray, world: int, mem: np.ndarray, room: float) -> float:
    """A bound for the batch split into micro-batches because memory binds (less k beta).

    Let C be the longest micro-batch's time less beta. Every sequence then runs where its time
    is at most C, so it takes at least d_j(C) = min {device_time_js : t_js <= C} device-time
    wherever it runs, f(C) in all. The longest micro-batch does at most N C of it, and at most
    what its devices' memory holds: Wcap(C), the most device-time sequences of at most N x room
    bytes carry (`mem`: each sequence's least bytes over its group's devices; a fractional
    knapsack). The rest runs in the other micro-batches, whose times add up to at least it / N:

        total - k beta >= min over C of  C + max(0, f(C) - min(N C, Wcap(C))) / N.

    Never below `divisible_bound` (which is max(C, f(C)/N) under the same C); equal to it when
    the whole batch fits the memory at once. f and Wcap change only at the t_js, so the minimum
    is at a breakpoint or where C crosses Wcap / N or f / N inside an interval."""
    n = len(t)
    if n == 0 or mem.sum() <= world * room:
        return divisible_bound(t, device_time, world)
    least = float(t.min(axis=1).max())
    if not np.isfinite(least) or not np.isfinite(mem).all() or (mem <= 0).any():
        return divisible_bound(t, device_time, world)  # a sequence fits no group: no plan, nothing to raise
    # d_j changes with C only for rows whose cheapest group finishes after the least C
    cheapest = device_time.argmin(axis=1)
    moving = t[np.arange(n), cheapest] > least
    t_m = t[moving]
    points = np.unique(np.concatenate([[least], t_m[np.isfinite(t_m) & (t_m > least)]]))
    budget = world * room
    best = np.inf
    for lo, hi in zip(points, np.append(points[1:], np.inf)):
        d = np.where(t <= lo, device_time, np.inf).min(axis=1)  # constant on [lo, hi)
        f = float(d.sum())
        order = np.argsort(-(d / mem), kind="stable")  # the most device-time per byte first
        fill = np.cumsum(mem[order])
        whole = int(np.searchsorted(fill, budget, side="right"))
        wcap = float(d[order[:whole]].sum())
        if whole < n:
            wcap += float(d[order[whole]]) * (budget - (fill[whole - 1] if whole else 0.0)) / float(mem[order[whole]])
        for c in (lo, wcap / world, f / world):
            if lo <= c < hi:
                best = min(best, c + max(0.0, f - min(world * c, wcap)) / world)
    return max(best, divisible_bound(t, device_time, world))  # equal or above it in exact arithmetic


def divisible_bound(t: np.ndarray, device_time: np.ndarray, world: int) -> float:
    """min over C of max(C, f(C) / world), f(C) = sum over rows of min {device_time : t <= C}."""
    least = float(t.min(axis=1).max())  # the least feasible C: every sequence finishes in some group
    cheapest = device_time.argmin(axis=1)
    # rows whose cheapest group already finishes within the least C add a constant; only the others move
    moving = t[np.arange(len(t)), cheapest] > least
    fixed = float(device_time[~moving].min(axis=1).sum()) if (~moving).any() else 0.0
    t_m, d_m = t[moving], device_time[moving]

    def f(c: float) -> float:
        if not len(t_m):
            return fixed
        return fixed + float(np.where(t_m <= c, d_m, np.inf).min(axis=1).sum())

    points = np.unique(np.concatenate([[least], t_m[np.isfinite(t_m) & (t_m > least)]]))
    # first breakpoint where C >= f(C)/world; the answer is C there or f just before it
    lo, hi = 0, len(points) - 1
    if points[hi] < f(points[hi]) / world:
        return f(points[hi]) / world
    while lo < hi:
        mid = (lo + hi) // 2
        if points[mid] >= f(points[mid]) / world:
            hi = mid
        else:
            lo = mid + 1
    c = float(points[lo])
    return c if lo == 0 else min(c, f(float(points[lo - 1])) / world)
