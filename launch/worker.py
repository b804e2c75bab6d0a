"""The per-rank entry point of `pliant train`, run by torchrun (or deepspeed, or a scheduler
that sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch


class StepProgress:
    """A progress bar on a terminal; a line every few steps in logs."""

    def __init__(self, total: int):
        import sys

        self.total = total
        self.every = max(1, total // 20)
        self.live = sys.stderr.isatty()
        if self.live:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.description}"), console=Console(stderr=True))
            self._task = self._bar.add_task("", total=total)
            self._bar.start()

    def update(self, r) -> None:
        mix = " ".join(f"{n}x{s}" for s, n in sorted(r.group_mix.items()))
        text = (f"loss {r.loss:.4f}  step {r.seconds:.2f}s (predicted {r.predicted_s:.2f}s)  groups {mix}  "
                f"micro-batches {r.micro_batches}")
        if self.live:
            self._bar.update(self._task, advance=1, description=text)
        elif r.step % self.every == 0 or r.step == self.total or r.step == 1:
            print(f"step {r.step}/{self.total}  {text}", flush=True)

    def close(self) -> None:
        if self.live:
            self._bar.stop()


def init_distributed(cluster) -> None:
    """Join the job's process group from torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR...)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if cluster.device == "cpu" else "cuda")
    import deepspeed

    if cluster.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend=cluster.backend, verbose=False,
                               timeout=datetime.timedelta(seconds=int(os.environ.get("PLIANT_PG_TIMEOUT_S", "300"))))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("pliant-worker")
    p.add_argument("--config", required=True, action="append", help="config file; repeat to overlay more")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--run-dir", default=None)
    p.add_argument("--plan", choices=["adaptive", "static", "dp"], default=None, help="override train.plan")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --run-dir")
    p.add_argument("--save-params", action="store_true", help="write the final parameters (tests)")
    args = p.parse_args(argv)

    from pliant.launch.config import load_config, with_overrides

    cfg = load_config(args.config)
    cfg = with_overrides(cfg, "train", steps=args.steps, plan=args.plan)
    import torch.distributed as dist

    from pliant.runtime.monitoring import NonFiniteLoss, RankMonitor

    run_dir = Path(args.run_dir) if args.run_dir else None
    monitor = RankMonitor(cfg.faults, run_dir)  # before DeepSpeed: it records DeepSpeed's collectives too
    try:
        rc = _train(args, cfg, run_dir, monitor)
    except NonFiniteLoss as e:
        monitor.close("nan-rollback")
        print(f"pliant: {e}", file=sys.stderr, flush=True)
        return NAN_EXIT
    except BaseException as e:
        monitor.close(f"exception: {type(e).__name__}: {e}"[:500])
        raise
    monitor.close("finished")
    dist.barrier()
    dist.destroy_process_group()
    return rc


NAN_EXIT = 3  # the worker's exit status when faults.nan = rollback stops the job


def _train(args, cfg, run_dir: Path | None, monitor) -> int:
    import torch.distributed as dist

    init_distributed(cfg.cluster)
    from pliant.runtime.checkpoint import Checkpointer
    from pliant.runtime.engine import Trainer

    trainer = Trainer(cfg.cluster, cfg.model, cfg.cost, cfg.planner, cfg.train, cfg.data)
    monitor.attach(trainer)
    rank = dist.get_rank()
    metrics = None
    if rank == 0 and run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics = open(run_dir / "metrics.jsonl", "a")
    checkpointer = Checkpointer(run_dir, cfg.train.keep_checkpoints, on_stage=monitor.checkpoint_stage) \
        if run_dir is not None else None
    if args.resume:
        if checkpointer is None:
            raise SystemExit("pliant: --resume needs --run-dir")
        if trainer.resume(checkpointer) and rank == 0:
            print(f"resumed from step {trainer.step_no} ({checkpointer.latest()})", flush=True)
    fail_at = int(os.environ.get("PLIANT_FAIL_AT_STEP", "0"))  # test hook: die after this step
    progress = StepProgress(cfg.train.steps) if rank == 0 else None
    try:
        while trainer.step_no < cfg.train.steps:
            monitor.begin_step(trainer.step_no + 1)
            skipped = trainer.engine.skipped_steps
            r = trainer.train_step()
            monitor.check_loss(r.step, r.loss, trainer.engine.skipped_steps > skipped)
            if checkpointer is not None and (r.step % cfg.train.checkpoint_every == 0 or r.step == cfg.train.steps):
                trainer.save_checkpoint(checkpointer)
            if fail_at and r.step == fail_at and rank == 0:
                os._exit(17)
            if rank == 0:
                if metrics:
                    metrics.write(json.dumps({**vars(r), "wall": time.time()}) + "\n")
                    metrics.flush()
                progress.update(r)
        if args.save_params and run_dir is not None and rank == 0:
            torch.save(trainer.parameters_vector(), run_dir / "final_params.pt")
    finally:
        trainer.close()
        if metrics:
            metrics.close()
        if progress:
            progress.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
