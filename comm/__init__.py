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
from .collectives import CollectiveMismatchError, set_metadata_check
from .counters import COUNTERS, CommCounters
from .kernels import kernel_names, torch_kernels, use_kernels
from .groups import SOLO, GroupRegistry, NotInGroupError, SPGroup, UnknownGroupError, contiguous_layouts
from .lasp2 import lasp2_attention
from .lasp2h import lasp2h_attention
from .ring import ring_attention
from .ulysses import ulysses_attention
from .linear_local import default_decay_rates
from .pack import PackLayout, PackLayoutError

__all__ = [
    "COUNTERS", "CollectiveMismatchError", "CommCounters", "GroupRegistry", "NotInGroupError", "PackLayout",
    "PackLayoutError", "SOLO", "SPGroup", "UnknownGroupError", "contiguous_layouts", "default_decay_rates",
    "kernel_names", "lasp2_attention", "lasp2h_attention", "ring_attention", "set_metadata_check", "torch_kernels",
    "ulysses_attention", "use_kernels",
]
