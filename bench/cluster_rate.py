"""The emulated cluster's link rate, derived from a reference cluster's cost model (issue 31):
the rate at which an SP group spanning two emulated nodes spends the same time on communication,
relative to its compute, as the reference cluster's smallest cross-node group does on its
longest sequence.

Reference (e.g. configs/flexsp-7b-64gpu.yaml: 8 GPUs a node, so its smallest group that spans
nodes has s_ref = 16 devices; its longest sequence L_ref = 191,872 tokens needs it):

    rho = comm_ref(L_ref, s_ref) / compute_ref(L_ref, s_ref)

with both from the reference's cost model (planner/cost.py: Ulysses bytes over the all-to-all
bandwidth of a group of that size; (a1 L^2 + a2 L) / s + gamma).

Emulated cluster: r ranks a node, its smallest cross-node group s = 2r, the sequence scaled
down by the lengths' factor, L = L_ref / factor. In an all-to-all each device sends D bytes
(the cost model's softmax_comm_bytes), an equal share to each of its s - 1 peers; r of those
peers sit on the other node, so each device sends D r / (s - 1) across, and a node's link
carries its r devices' shares: D r^2 / (s - 1) bytes each way, at the link rate B (bytes/s).
The intra-node shares go over loopback, free by comparison. So

    comm_emu(L, s) = D r^2 / ((s - 1) B),  and  comm_emu / compute_emu(L, s) = rho
    <=>  B = D r^2 / ((s - 1) rho compute_emu(L, s)).

compute_emu comes from the emulated config's cost coefficients, which `pliant profile` fits on
the emulated cluster (compute does not depend on the link).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class RateDerivation:
    reference_length: int
    reference_group: int
    reference_comm_ms: float
    reference_compute_ms: float
    ratio: float  # rho: comm / compute of the reference's cross-node group
    length: int
    group: int
    ranks_per_node: int
    compute_ms: float
    bytes_per_device: float  # D: what one device sends in the group's all-to-alls, per step
    link_bytes: float  # D r^2 / (s - 1): what one node's link carries each way
    link_mbit: float

    @property
    def formula(self) -> str:
        return ("B = D r^2 / ((s - 1) rho compute(L, s)) = "
                f"{self.bytes_per_device:.6g} B x {self.ranks_per_node}^2 / ({self.group - 1} x {self.ratio:.4g} x "
                f"{self.compute_ms:.4g} ms) = {self.link_mbit:.4g} Mbit/s; rho = {self.reference_comm_ms:.4g} ms / "
                f"{self.reference_compute_ms:.4g} ms (reference: L = {self.reference_length}, s = "
                f"{self.reference_group})")

    def to_dict(self) -> dict:
        return {**asdict(self), "formula": self.formula}


def derive_link_mbit(reference, reference_devices_per_node: int, reference_length: int, emulated,
                     ranks_per_node: int, factor: float) -> RateDerivation:
    """`reference` and `emulated`: planner CostModels. Raises ValueError where a side has no
    communication to match (a softmax-free model, or a group that Ulysses and LASP-2H leave
    without all-to-all bytes)."""
    s_ref, s = 2 * reference_devices_per_node, 2 * ranks_per_node
    if ranks_per_node < 1 or factor <= 0:
        raise ValueError(f"ranks_per_node must be >= 1 and factor > 0, got {ranks_per_node} and {factor}")
    ref_len = np.array([reference_length])
    comm_ref = float(reference.softmax_comm_ms(ref_len, s_ref)[0])
    compute_ref = float(reference.compute_ms(ref_len, s_ref)[0])
    if comm_ref <= 0:
        raise ValueError(f"the reference's group of {s_ref} sends nothing for its softmax layers: no ratio to match")
    rho = comm_ref / compute_ref
    length = int(emulated.padded(np.array([int(reference_length // factor)]), s)[0])  # as the cost model pads it
    emu_len = np.array([length])
    d = float(emulated.softmax_comm_bytes(emu_len, s)[0])
    compute = float(emulated.compute_ms(emu_len, s)[0])
    if d <= 0:
        raise ValueError(f"the emulated model's group of {s} sends nothing for its softmax layers: no rate to derive")
    if compute <= 0 or compute_ref <= 0:
        raise ValueError(f"compute time {compute_ref:g} ms (reference) and {compute:g} ms (emulated) must be positive: "
                         f"check the cost coefficients")
    link_bytes = d * ranks_per_node ** 2 / (s - 1)
    rate = link_bytes / (rho * compute / 1e3)  # bytes per second
    return RateDerivation(reference_length, s_ref, comm_ref, compute_ref, rho, length, s, ranks_per_node, compute,
                          d, link_bytes, rate * 8 / 1e6)
