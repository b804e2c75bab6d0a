"""Sequence-parallel collectives (torch.distributed only; gloo on CPU, nccl on CUDA).

Operators take this rank's chunks of a packed set of sequences (`PackLayout`) and the SP
group (`GroupRegistry.get`), and are differentiable:

* `lasp2_attention`: linear attention, one AllGather of memory states (LASP-2);
* `ring_attention`: linear attention, states passed rank to rank (LASP-1, the baseline);
* `ulysses_attention`: softmax attention, all-to-all sequence <-> heads (DeepSpeed-Ulysses);
* `lasp2h_attention`: softmax attention of hybrid models, AllGather of K and V (LASP-2H).

Their local compute runs fused varlen kernels on CUDA when installed (flash-linear-attention,
flash-attn) and the torch path otherwise (`kernels.py`: `kernel_names`, `torch_kernels`).
"""
import importlib
from typing import TYPE_CHECKING

# names -> submodule; imported on first use (PEP 562), so that the config schema and the fault
# monitor's master, which import pliant.comm.monitor.spec, do not import torch
_EXPORTS = {
    "CollectiveMismatchError": "collectives", "set_metadata_check": "collectives",
    "COUNTERS": "counters", "CommCounters": "counters",
    "kernel_names": "kernels", "torch_kernels": "kernels", "use_kernels": "kernels",
    "SOLO": "groups", "GroupRegistry": "groups", "NotInGroupError": "groups", "SPGroup": "groups",
    "UnknownGroupError": "groups", "contiguous_layouts": "groups",
    "lasp2_attention": "lasp2", "lasp2h_attention": "lasp2h", "ring_attention": "ring",
    "ulysses_attention": "ulysses", "default_decay_rates": "linear_local",
    "PackLayout": "pack", "PackLayoutError": "pack",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from .collectives import CollectiveMismatchError, set_metadata_check
    from .counters import COUNTERS, CommCounters
    from .groups import SOLO, GroupRegistry, NotInGroupError, SPGroup, UnknownGroupError, contiguous_layouts
    from .kernels import kernel_names, torch_kernels, use_kernels
    from .lasp2 import lasp2_attention
    from .lasp2h import lasp2h_attention
    from .linear_local import default_decay_rates
    from .pack import PackLayout, PackLayoutError
    from .ring import ring_attention
    from .ulysses import ulysses_attention
