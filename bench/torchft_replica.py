"""One torchft replica group (one process) for `pliant bench faults`' side-by-side run: a
small model trained with torchft's DistributedDataParallel and Manager (gloo), joined to a
torchft lighthouse, with a fault injected at a chosen step. Every step appends a JSON line
to --log (wall time, step, quorum size, committed or not, the error the manager holds).

    python -m pliant.bench.torchft_replica --replica 1 --lighthouse http://host:port \\
        --log r1.jsonl --fault crash --fault-step 6
"""
from __future__ import annotations

import argparse
import os
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from pliant.io import strict_dumps


def log(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(strict_dumps(row) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("pliant-torchft-replica")
    p.add_argument("--replica", type=int, required=True)
    p.add_argument("--lighthouse", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--min-replicas", type=int, default=2)
    p.add_argument("--step-s", type=float, default=0.2, help="compute time per step")
    p.add_argument("--fault", choices=["none", "crash", "hang"], default="none")
    p.add_argument("--fault-step", type=int, default=6)
    p.add_argument("--timeout-s", type=float, default=60.0, help="the Manager's timeout (torchft's default: 60)")
    args = p.parse_args(argv)

    from torchft.ddp import DistributedDataParallel
    from torchft.manager import Manager
    from torchft.optim import OptimizerWrapper
    from torchft.process_group import ProcessGroupGloo

    out = Path(args.log)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    opt_inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    store = dist.TCPStore("localhost", 0, is_master=True, wait_for_workers=False)
    timeout = timedelta(seconds=args.timeout_s)
    manager = Manager(
        pg=ProcessGroupGloo(timeout=timeout), min_replica_size=args.min_replicas,
        load_state_dict=lambda sd: (model.load_state_dict(sd["model"]), opt_inner.load_state_dict(sd["optim"])),
        state_dict=lambda: {"model": model.state_dict(), "optim": opt_inner.state_dict()},
        replica_id=f"replica_{args.replica}", store_addr="localhost", store_port=store.port, rank=0, world_size=1,
        lighthouse_addr=args.lighthouse, timeout=timeout)
    ddp = DistributedDataParallel(manager, model)
    opt = OptimizerWrapper(manager, opt_inner)
    gen = torch.Generator().manual_seed(args.replica)
    while manager.current_step() < args.steps:
        step = manager.current_step()
        if args.fault != "none" and step == args.fault_step:
            log(out, {"fired": args.fault, "step": step, "wall": time.time()})
            if args.fault == "crash":
                os._exit(1)
            time.sleep(3600)  # alive, heartbeating (torchft's heartbeat is a native thread), never steps again
        opt.zero_grad()
        x = torch.randn(32, 64, generator=gen)
        loss = ddp(x).square().mean()
        loss.backward()
        time.sleep(args.step_s)
        opt.step()  # should_commit: every replica agrees, or the step is dropped
        err = manager.errored()
        log(out, {"step": step, "wall": time.time(), "participants": manager.num_participants(),
                  "committed": manager.current_step() > step, "error": None if err is None else
                  str(err.original_exception)[:400]})
    manager.shutdown(wait=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
