"""The training-step part of `scripts/gpu-check.sh` (issue 31): on one GPU, a few steps of the
config's job under torch.profiler, and what they say about the step: how much of its wall time
the GPU spent in kernels, and how many kernels the host launched per step and per
forward-backward pass (micro-batch). Run as a rank (`pliant bench gpu-step`, under torchrun,
like `pliant train`); rank 0 writes the JSON. On a CPU it measures the same steps, with the
aten ops per pass in place of launches and no busy fraction, so that the path is tested
without a GPU.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

from pliant.io import atomic_write_text, strict_dumps

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch")


def kernel_stats(events, on_cuda: bool) -> dict:
    """Of a profile's events: the time the GPU ran at least one kernel (us: the union of the
    kernels' intervals, so kernels on several streams count once), kernel launches and aten ops."""
    from torch.autograd import DeviceType

    spans, launches, aten = [], 0, 0
    for e in events:
        if e.name.startswith("aten::"):
            aten += 1
        if on_cuda and e.name in LAUNCHES:
            launches += 1
        if on_cuda and e.device_type == DeviceType.CUDA:
            spans.append((e.time_range.start, e.time_range.end))
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return {"kernel_us": busy, "launches": launches, "aten_ops": aten}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("pliant-gpu-step")
    p.add_argument("--config", required=True, action="append")
    p.add_argument("--out", required=True)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv)

    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from pliant.config import load_config
    from pliant.runtime.trainer import Trainer

    cfg = load_config(args.config)
    trainer = Trainer.from_config(cfg, steps=args.warmup + args.steps)
    on_cuda = trainer.device.type == "cuda"
    try:
        for _ in range(args.warmup):
            trainer.train_step()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
        steps = []
        for _ in range(args.steps):
            if on_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with profile(activities=activities) as prof:
                r = trainer.train_step()
                if on_cuda:
                    torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            stats = kernel_stats(prof.events(), on_cuda)
            steps.append({"wall_s": wall, "step_s": r.seconds, "micro_batches": r.micro_batches, "tokens": r.tokens,
                          **stats})
    finally:
        trainer.close()
    if trainer.rank == 0:
        passes = [s["micro_batches"] for s in steps]
        summary = {
            "device": torch.cuda.get_device_name() if on_cuda else platform.processor() or "cpu",
            "step_s_median": statistics.median(s["step_s"] for s in steps),
            "gpu_busy_fraction": statistics.median(s["kernel_us"] / 1e6 / s["wall_s"] for s in steps) if on_cuda else None,
            "kernel_launches_per_step": statistics.median(s["launches"] for s in steps) if on_cuda else None,
            "kernel_launches_per_pass": statistics.median(s["launches"] / m for s, m in zip(steps, passes))
            if on_cuda else None,
            "aten_ops_per_pass": statistics.median(s["aten_ops"] / m for s, m in zip(steps, passes)),
        }
        doc = {"benchmark": "gpu-step", "config": args.config, "torch": torch.__version__, "summary": summary,
               "steps": steps}
        atomic_write_text(Path(args.out), strict_dumps(doc, indent=1))
        print(f"step {summary['step_s_median']:.3f} s; GPU busy {summary['gpu_busy_fraction']}; launches per pass "
              f"{summary['kernel_launches_per_pass']}; aten ops per pass {summary['aten_ops_per_pass']:.0f}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
