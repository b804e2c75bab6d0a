"""`pliant bench comm`: the SP attention operators side by side on one group of ranks.

Runs under torchrun (`pliant bench comm` starts it): every rank builds the same sequence,
keeps its chunk, and times forward + backward of LASP-2, the LASP-1 ring, Ulysses and
LASP-2H (median over repeats, after a warm-up), reads the bytes each rank moved from the
comm counters and sets them beside the analytic volume. DeepSpeed's Ulysses
`DistributedAttention` runs on the same inputs as a peer: time ratio and max output
difference. Rank 0 writes JSON and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

METHODS = ("lasp2", "ring", "ulysses", "lasp2h", "deepspeed")


def analytic_bytes(method: str, L: int, s: int, heads: int, kv_heads: int, d: int, elem: int) -> float:
    """Bytes one rank sends per forward + backward (the busiest rank for the ring)."""
    if s == 1:
        return 0.0
    local = -(-L // s)
    state = heads * d * d * (8 if elem == 8 else 4)  # LASP states: float32, or float64 for float64 inputs
    if method == "lasp2":
        return 2 * (s - 1) * state  # AllGather of states forward, of their gradients backward
    if method == "ring":
        return 2 * state if s > 2 else state  # a middle rank sends one state forward and one gradient back
    if method in ("ulysses", "deepspeed"):
        kv = kv_heads if kv_heads % s == 0 else heads
        per_pass = (2 * heads + 2 * kv) * local * d * elem * (s - 1) / s  # q, k, v, o
        return 2 * per_pass
    if method == "lasp2h":
        kv = 2 * kv_heads * local * d * elem
        return kv * (s - 1) + kv * (s - 1)  # AllGather K, V; reduce-scatter dK, dV
    raise ValueError(method)


def _worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.sequence.layer import DistributedAttention

    import pliant.comm as C
    from pliant.comm.linear_local import default_decay_rates

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    rank, world = dist.get_rank(), dist.get_world_size()
    registry = C.GroupRegistry([(0, world)])
    g = registry.get(0, world)
    dtype = getattr(torch, args.dtype)
    H, Hkv, d = args.heads, args.kv_heads, args.head_dim
    rates = default_decay_rates(H)
    C.set_metadata_check(False)  # measure the operators, not the safety check

    def local_attn(q, k, v, *rest, **kw):  # DeepSpeed hands [S, B, h, d]
        qh, kh, vh = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        if kh.shape[1] != qh.shape[1]:
            kh = kh.repeat_interleave(qh.shape[1] // kh.shape[1], dim=1)
            vh = vh.repeat_interleave(qh.shape[1] // vh.shape[1], dim=1)
        o = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
        return o.permute(2, 0, 1, 3)

    ds_attn = DistributedAttention(local_attn, g.pg, scatter_idx=2, gather_idx=0)

    def make_step(method, layout, q0, k0, v0, w):
        def step():
            q, k, v = (t.clone().requires_grad_(True) for t in (q0, k0, v0))
            if method in ("lasp2", "ring"):  # linear attention layers use every head for k and v
                kf, vf = (t.repeat_interleave(H // Hkv, 1) if Hkv != H else t for t in (k, v))
                op = C.lasp2_attention if method == "lasp2" else C.ring_attention
                out = op(q, kf, vf, layout, g, rates)
            elif method == "ulysses":
                out = C.ulysses_attention(q, k, v, layout, g)
            elif method == "lasp2h":
                out = C.lasp2h_attention(q, k, v, layout, g)
            else:
                out = ds_attn(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), 1).squeeze(1)
            (out * w).sum().backward()
            return out.detach()
        return step

    rows: list[dict[str, Any]] = []
    for L in args.lengths:
        layout = C.PackLayout.from_lengths([L], world)
        gen = torch.Generator().manual_seed(1234 + L)
        full = [torch.randn(L, h, d, generator=gen, dtype=dtype) * 0.5 for h in (H, Hkv, Hkv, H)]
        q0, k0, v0, w = (layout.shard([x], g.index) for x in full)
        outputs: dict[str, torch.Tensor] = {}
        steps = {}
        for method in args.methods:
            if method in ("ulysses", "deepspeed") and H % world:
                continue
            if L > args.softmax_max_len and method in ("ulysses", "lasp2h", "deepspeed"):
                continue
            steps[method] = make_step(method, layout, q0, k0, v0, w)
        times: dict[str, list[float]] = {m: [] for m in steps}
        sent: dict[str, float] = {}
        # round-robin over the methods, so that every method sees the same machine conditions
        for rep in range(args.repeats + 1):  # the first round is a warm-up
            for method, step in steps.items():
                C.COUNTERS.reset()
                dist.barrier()
                t0 = time.perf_counter()
                outputs[method] = step()
                dist.barrier()
                if rep:
                    times[method].append(time.perf_counter() - t0)
                sent[method] = C.COUNTERS.total().bytes_sent
        elem = torch.tensor([], dtype=dtype).element_size()
        for method in steps:
            everyone = torch.zeros(world, dtype=torch.float64)
            dist.all_gather_into_tensor(everyone, torch.tensor([sent[method]], dtype=torch.float64))
            rows.append({
                "method": method, "length": L, "time_s": statistics.median(times[method]), "times_s": times[method],
                "bytes_per_rank": None if method == "deepspeed" else float(everyone.max()),
                "bytes_per_rank_by_rank": None if method == "deepspeed" else everyone.tolist(),
                "analytic_bytes_per_rank": analytic_bytes(method, L, world, H, Hkv, d, elem),
            })
            if rank == 0:
                print(f"  {method:9s} L={L:>7d}  {statistics.median(times[method]):8.3f} s", flush=True)
        if "ulysses" in outputs and "deepspeed" in outputs:
            diff = torch.tensor([(outputs["ulysses"] - outputs["deepspeed"]).abs().max().item()], dtype=torch.float64)
            dist.all_reduce(diff, op=dist.ReduceOp.MAX)
            for r in rows:
                if r["length"] == L and r["method"] == "deepspeed":
                    r["max_diff_vs_ulysses"] = float(diff)
    if rank == 0:
        result = summarise(rows, args, world)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print_table(result)
    dist.barrier()
    dist.destroy_process_group()


def summarise(rows: list[dict[str, Any]], args, world: int) -> dict[str, Any]:
    def t(method, L):
        return next((r["time_s"] for r in rows if r["method"] == method and r["length"] == L), None)

    lengths = sorted({r["length"] for r in rows})
    lasp2_bytes = {str(L): next(r["bytes_per_rank"] for r in rows if r["method"] == "lasp2" and r["length"] == L)
                   for L in lengths if t("lasp2", L) is not None}
    ratio_ring = {str(L): t("lasp2", L) / t("ring", L) for L in lengths if t("lasp2", L) and t("ring", L)}
    ratio_ds = {str(L): t("ulysses", L) / t("deepspeed", L) for L in lengths if t("ulysses", L) and t("deepspeed", L)}
    diffs = [r["max_diff_vs_ulysses"] for r in rows if "max_diff_vs_ulysses" in r]
    longest = str(max(lengths))
    return {
        "benchmark": "comm",
        "world": world, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
        "dtype": args.dtype, "repeats": args.repeats, "lengths": lengths, "backend": "gloo",
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "rows": rows,
        "summary": {
            "lasp2_bytes_per_rank": lasp2_bytes,
            "lasp2_bytes_constant": len(set(lasp2_bytes.values())) == 1,
            "lasp2_over_ring_time": ratio_ring,
            "lasp2_over_ring_time_64k": ratio_ring.get("65536", ratio_ring.get(longest)),
            "ulysses_over_deepspeed_time_by_length": ratio_ds,
            "ulysses_over_deepspeed_time": statistics.median(ratio_ds.values()) if ratio_ds else None,
            "ulysses_vs_deepspeed_max_diff": max(diffs) if diffs else None,
        },
    }


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"SP attention, world {result['world']} (gloo), {result['heads']} heads x {result['head_dim']}, "
                    f"{result['dtype']}: forward+backward, median of {result['repeats']}", title_justify="left")
    for col in ("method", "length", "time s", "bytes/rank", "analytic", "note"):
        t.add_column(col, justify="left" if col in ("method", "note") else "right")
    for r in result["rows"]:
        note = f"max diff {r['max_diff_vs_ulysses']:.1e}" if "max_diff_vs_ulysses" in r else ""
        t.add_row(r["method"], str(r["length"]), f"{r['time_s']:.3f}",
                  "-" if r["bytes_per_rank"] is None else f"{r['bytes_per_rank']:,.0f}",
                  f"{r['analytic_bytes_per_rank']:,.0f}", note)
    Console().print(t)
    s = result["summary"]
    Console().print(f"LASP-2 bytes/rank by length: {s['lasp2_bytes_per_rank']}; LASP-2 / ring time: "
                    f"{ {k: round(v, 3) for k, v in s['lasp2_over_ring_time'].items()} }; Ulysses / DeepSpeed time: "
                    f"{ {k: round(v, 3) for k, v in s['ulysses_over_deepspeed_time_by_length'].items()} }, "
                    f"max diff {s['ulysses_vs_deepspeed_max_diff']}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser("pliant-bench-comm-worker")
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    p.add_argument("--softmax-max-len", type=int, default=1 << 30)
    return p.parse_args(argv)


def launch(world: int, worker_args: list[str], timeout_s: float | None = None) -> int:
    """Start the benchmark on `world` local ranks through torchrun."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           "-m", "pliant.bench.comm_bench", *worker_args]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world))}
    return subprocess.run(cmd, env=env, timeout=timeout_s).returncode


if __name__ == "__main__":
    _worker(parse())
