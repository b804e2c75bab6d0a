"""What every training rank builds before its first step, the same for `pliant train`,
`pliant profile`, `pliant bench train` and the RL learner: join the job's process group
(torchrun, deepspeed, a scheduler or the RL driver set RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT / LOCAL_RANK), check it against the config's cluster, and make the device, the
planner and the SP groups; then DeepSpeed's engine over the model and its optimizer.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pliant.comm import GroupRegistry, contiguous_layouts
from pliant.planner import Planner
from pliant.planner.errors import InputError
from pliant.planner.spec import ClusterSpec, CostSpec, ModelSpec, PlannerSpec

PG_TIMEOUT_ENV = "PLIANT_PG_TIMEOUT_S"


class LaunchError(InputError, RuntimeError):
    """The launched processes do not match the job config."""


def rank_device(kind: str) -> torch.device:
    """This rank's device for a cluster's device kind ('cuda': the one torch.cuda.set_device chose)."""
    return torch.device("cuda", torch.cuda.current_device()) if kind == "cuda" else torch.device("cpu")


def peak_memory_bytes(device: torch.device) -> int:
    """This rank's peak: CUDA max allocated, or the process's max RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def init_distributed(cluster: ClusterSpec, timeout_s: float | None = None) -> None:
    """Join the job's process group from the launcher's variables, on the cluster's backend
    (a no-op when it is already joined, e.g. by a test's process pool). The timeout:
    `timeout_s`, else $PLIANT_PG_TIMEOUT_S, else 300 s."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if cluster.device == "cpu" else "cuda")
    if dist.is_initialized():
        return
    import deepspeed

    if cluster.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    seconds = timeout_s if timeout_s is not None else float(os.environ.get(PG_TIMEOUT_ENV, "300"))
    deepspeed.init_distributed(dist_backend=cluster.backend, verbose=False,
                               timeout=datetime.timedelta(seconds=seconds))


@dataclass
class RankSetup:
    """One rank of a training group: who it is, its device, the planner (rank 0 plans; every
    rank knows the cost model) and the SP groups every plan's groups are drawn from."""

    rank: int
    world: int
    device: torch.device
    planner: Planner
    registry: GroupRegistry


def setup_rank(cluster: ClusterSpec, model: ModelSpec, cost: CostSpec, planner: PlannerSpec,
               registry: GroupRegistry | None = None, timeout_s: float | None = None) -> RankSetup:
    """Join the process group (unless joined already) and build this rank's shared pieces.
    `registry`: SP groups made already (several trainers in one process share one)."""
    init_distributed(cluster, timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != cluster.world_size:
        raise LaunchError(f"the config's cluster has {cluster.world_size} devices ({cluster.nodes} nodes x "
                          f"{cluster.devices_per_node}), but {world} processes were launched")
    plans = Planner.from_specs(cluster, model, cost, planner)
    registry = registry or GroupRegistry(contiguous_layouts(world, cluster.devices_per_node, plans.sizes))
    return RankSetup(rank, world, rank_device(cluster.device), plans, registry)


def deepspeed_engine(module: torch.nn.Module, world: int, model: ModelSpec, optimizer: torch.optim.Optimizer,
                     device: torch.device, scheduler=None, grad_clip: float | None = None):
    """DeepSpeed's engine over `module` for a process group of `world` ranks (joined already):
    ZeRO stage and precision from the model spec, one sample per rank per micro-step (the
    plan executor sets the gradient-accumulation boundary itself: a plan's micro-batches add
    up to one step), clipping at `grad_clip` (None: none). Returns (engine, optimizer, scheduler)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if device.type == "cpu" else "cuda")
    import deepspeed

    config = {
        "train_batch_size": world,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": model.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # always explicit: DeepSpeed clips at 1.0 when the key is absent
        "gradient_clipping": grad_clip if grad_clip is not None else 0.0,
    }
    if model.dtype == "bf16":
        config["bf16"] = {"enabled": True}
    elif model.dtype == "fp16":
        config["fp16"] = {"enabled": True}
    engine, optimizer, _, scheduler = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=config, dist_init_required=False)
    return engine, optimizer, scheduler
