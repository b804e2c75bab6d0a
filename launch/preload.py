"""What the workers' fork server (launch/elastic.py) imports once for all of a node's ranks:
torch, TorchDynamo (the optimizers import it), the worker's modules and, on CPU, DeepSpeed with
its op probe and shared-memory op loaded (on CUDA DeepSpeed is left to each rank: its probes
query the GPUs, and a CUDA context does not survive a fork). $PLIANT_PRELOAD_EXTRA adds modules
(comma-separated: the launcher adds transformers for a Hugging Face model).

Nothing here may start a thread, open a device or join a process group: every rank is a fork
of this process.
"""
from __future__ import annotations

import gc
import importlib
import os

MODULES = ["torch", "torch.distributed", "torch._dynamo", "pliant.config", "pliant.runtime.trainer",
           "pliant.runtime.monitoring", "pliant.runtime.callbacks", "pliant.runtime.checkpoint",
           "pliant.runtime.faults", "pliant.launch.worker"]
EXTRA_ENV = "PLIANT_PRELOAD_EXTRA"


def preload() -> None:
    for name in MODULES + [m for m in os.environ.get(EXTRA_ENV, "").split(",") if m]:
        importlib.import_module(name)
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        import deepspeed.ops
        from deepspeed.comm.torch import build_shm_op

        deepspeed.ops.__compatible_ops__  # the op probe runs compilers: once, here
        build_shm_op()  # loaded (built on first use) once; each rank's DeepSpeed takes it from the cache
    import torch

    if torch.cuda.is_initialized():  # a guard for CUDA nodes
        raise RuntimeError("the workers' preload initialized CUDA, which a forked rank cannot use")
    gc.collect()
    gc.freeze()  # what the ranks inherit stays out of their collector's passes (and shared)


preload()
