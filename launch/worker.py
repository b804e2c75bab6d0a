"""The per-rank entry point of `pliant train`, run by torchrun (or deepspeed, or a scheduler
that sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT)."""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("pliant-worker")
    p.add_argument("--config", required=True, action="append", help="config file; repeat to overlay more")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--run-dir", default=None)
    p.add_argument("--plan", choices=["adaptive", "static", "dp", "batchada"], default=None, help="override train.plan")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --run-dir")
    p.add_argument("--save-params", action="store_true", help="write the final parameters (tests)")
    args = p.parse_args(argv)

    marks = {"process": _process_started()}
    from pliant.config import load_config, with_overrides

    cfg = load_config(args.config)
    cfg = with_overrides(cfg, "train", steps=args.steps, plan=args.plan)
    import torch.distributed as dist

    from pliant.planner.errors import InputError
    from pliant.runtime.monitoring import NonFiniteLoss, RankMonitor

    run_dir = Path(args.run_dir) if args.run_dir else None
    monitor = RankMonitor(cfg.faults, run_dir)  # before DeepSpeed: it records DeepSpeed's collectives too
    marks["imports"] = time.time()
    try:
        rc = _train(args, cfg, run_dir, monitor, marks)
    except NonFiniteLoss as e:
        monitor.close("nan-rollback")
        print(f"pliant: {e}", file=sys.stderr, flush=True)
        return NAN_EXIT
    except InputError as e:  # bad input, not a fault: one line, no traceback
        monitor.close_on(e)
        print(f"pliant: error: {e}", file=sys.stderr, flush=True)
        return INPUT_EXIT
    except BaseException as e:
        monitor.close_on(e)
        raise
    monitor.close("finished")
    dist.barrier()
    dist.destroy_process_group()
    gc.freeze()  # the exit's last collection would walk every object of torch and DeepSpeed: 3 s of 4 ranks
    return rc


def _process_started() -> float:
    import psutil

    return psutil.Process().create_time()


NAN_EXIT = 3  # the worker's exit status when faults.nan = rollback stops the job
INPUT_EXIT = 2  # ... when its input is wrong (a pliant input error), as the command line's errors


def _train(args, cfg, run_dir: Path | None, monitor, marks: dict[str, float]) -> int:
    """Build the trainer from the config and run it, the extras attached as callbacks."""
    from pliant.runtime.callbacks import standard_callbacks
    from pliant.runtime.checkpoint import Checkpointer
    from pliant.runtime.trainer import Trainer
    from pliant.runtime.faults import test_hooks_from_env

    trainer = Trainer.from_config(cfg)
    gc.collect()  # start-up's garbage first, then what it made that lives to the end: out of the
    gc.freeze()  # collector's full passes
    marks["trainer"] = time.time()
    checkpointer = Checkpointer(run_dir, cfg.train.keep_checkpoints, on_stage=monitor.checkpoint_stage) \
        if run_dir is not None else None
    if args.resume:
        if checkpointer is None:
            raise SystemExit("pliant: --resume needs --run-dir")
        if trainer.resume(checkpointer) and trainer.rank == 0:
            print(f"resumed from step {trainer.step_no} ({checkpointer.latest()})", flush=True)
        marks["resumed"] = time.time()
    callbacks = [monitor, *standard_callbacks(trainer, run_dir, checkpointer, save_params=args.save_params,
                                              after_checkpoint=test_hooks_from_env(),
                                              startup=(monitor.attempt, marks))]
    try:
        trainer.train(callbacks)
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
