"""Joining the job's process group, as every entry point that trains does (torchrun, deepspeed
or a scheduler set RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT / LOCAL_RANK)."""
from __future__ import annotations

import datetime
import os

import torch

PG_TIMEOUT_ENV = "PLIANT_PG_TIMEOUT_S"


def init_distributed(cluster) -> None:
    """Join the job's process group from the launcher's variables, on the cluster's backend
    (a no-op when it is already joined, e.g. by a test's process pool)."""
    import torch.distributed as dist

    os.environ.setdefault("DS_ACCELERATOR", "cpu" if cluster.device == "cpu" else "cuda")
    if dist.is_initialized():
        return
    import deepspeed

    if cluster.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend=cluster.backend, verbose=False,
                               timeout=datetime.timedelta(seconds=int(os.environ.get(PG_TIMEOUT_ENV, "300"))))
