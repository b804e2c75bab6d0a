"""`pliant bench comm`: the SP attention operators side by side on one group of ranks.

Runs under torchrun (`pliant bench comm` starts it): every rank builds the same sequence,
keeps its chunk, and times forward + backward of LASP-2, the LASP-1 ring, Ulysses, LASP-2H
and the gated delta rule (Gated DeltaNet) in its three forms: `gdn_gather` (LASP-2's form, one
AllGather of chunk maps), `gdn_ring` (the state rank to rank) and `gdn_heads` (all-to-all to
whole sequences over H / s heads, Megatron's); median over repeats, after a warm-up. It counts
their aten ops (torch.profiler; each one a kernel launch on a GPU; for `gdn_gather` also those
of the local part alone), reads the bytes each rank moved from the comm counters and sets them
beside the analytic volume. Every length runs as one sequence and as many short
sequences of the same tokens (`--short`), the common case of real corpora. DeepSpeed's Ulysses
`DistributedAttention` runs on the same inputs as a peer: time ratio and max output
difference. Rank 0 writes JSON and prints a table.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from pliant.io import strict_dumps

METHODS = ("lasp2", "ring", "ulysses", "lasp2h", "deepspeed", "gdn_gather", "gdn_ring", "gdn_heads")
GDN_FORMS = {"gdn_gather": "gather", "gdn_ring": "ring", "gdn_heads": "heads"}  # method -> gated_delta_attention form
HEAD_SHARDED = ("ulysses", "deepspeed", "gdn_heads")  # need the heads to divide over the group
SOFTMAX = ("ulysses", "lasp2h", "deepspeed")
GDN_OPS_BOUND, GDN_OPS_RATIO_BOUND = 2000, 1.5  # the bounds on gdn_gather's ops (one sequence; many / one)


def gdn_gather_volume(s: int, heads: int, dk: int, dv: int, acc: int) -> dict[str, int]:
    """Bytes one rank sends per sequence in gdn_gather: forward, the AllGather of its chunk maps (A, B),
    heads x dk x (dk + dv) values to each of s - 1 peers; backward, that of its entering states' gradients,
    heads x dk x dv; `acc` the accumulation dtype's bytes. Independent of the length."""
    forward, backward = (s - 1) * heads * dk * (dk + dv) * acc, (s - 1) * heads * dk * dv * acc
    return {"forward": forward, "backward": backward, "total": forward + backward}


def analytic_bytes(method: str, lengths: list[int], s: int, heads: int, kv_heads: int, d: int, elem: int) -> float:
    """Bytes one rank sends per forward + backward of a pack (the busiest rank for the ring)."""
    if s == 1:
        return 0.0
    local = sum(-(-L // s) for L in lengths)
    acc = 8 if elem == 8 else 4  # LASP and gated delta states: float32 (float64)
    state = len(lengths) * heads * d * d * acc
    if method == "lasp2":
        return 2 * (s - 1) * state  # AllGather of states forward, of their gradients backward
    if method == "gdn_gather":
        return len(lengths) * gdn_gather_volume(s, heads, d, d, acc)["total"]
    if method in ("ring", "gdn_ring"):
        return 2 * state if s > 2 else state  # a middle rank sends one state forward and one gradient back
    if method in ("ulysses", "deepspeed"):
        kv = kv_heads if kv_heads % s == 0 else heads
        per_pass = (2 * heads + 2 * kv) * local * d * elem * (s - 1) / s  # q, k, v, o
        return 2 * per_pass
    if method == "gdn_heads":  # q, k, v, g, beta, o forward; their gradients backward
        return 2 * heads * (4 * d + 2) * local * elem * (s - 1) / s
    if method == "lasp2h":
        kv = 2 * kv_heads * local * d * elem
        return kv * (s - 1) + kv * (s - 1)  # AllGather K, V; reduce-scatter dK, dV
    raise ValueError(method)


def packs(L: int, short: int) -> list[tuple[str, list[int]]]:
    """The packs of L tokens each length runs: one sequence, and L / short sequences of `short` tokens."""
    out = [("one", [L])]
    if short and L // short > 1:
        out.append(("many", [short] * (L // short) + ([L % short] if L % short else [])))
    return out


def aten_ops(step) -> int:
    """aten ops of one call of `step` on this rank (torch.profiler; each a kernel launch on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def _worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.sequence.layer import DistributedAttention

    import pliant.comm as C
    from pliant.comm.gated_delta import chunk_gated_delta, gated_delta_attention
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

    def every_head(t):  # linear attention and gated delta layers use every head for k and v
        return t.repeat_interleave(H // Hkv, 1) if Hkv != H else t

    def gdn_step(run, gdn0, w):
        """forward + backward of `run(q, k, v, gate, beta)` on fresh leaves of the gated delta inputs."""
        def step():
            leaves = [t.clone().requires_grad_(True) for t in gdn0]
            out = run(*leaves)
            (out * w).sum().backward()
            return out.detach()
        return step

    def make_step(method, layout, q0, k0, v0, w, gdn0):
        if method in GDN_FORMS:
            return gdn_step(lambda *x: gated_delta_attention(*x, layout, g, form=GDN_FORMS[method]), gdn0, w)

        def step():
            q, k, v = (t.clone().requires_grad_(True) for t in (q0, k0, v0))
            if method in ("lasp2", "ring"):
                kf, vf = (every_head(t) for t in (k, v))
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
    elem = torch.tensor([], dtype=dtype).element_size()

    def gathered(x: float) -> list[float]:
        everyone = torch.zeros(world, dtype=torch.float64)
        dist.all_gather_into_tensor(everyone, torch.tensor([float(x)], dtype=torch.float64))
        return everyone.tolist()

    for L in args.lengths:
        for case, lengths in packs(L, args.short):
            layout = C.PackLayout.from_lengths(lengths, world)
            gen = torch.Generator().manual_seed(1234 + L)
            full = [[torch.randn(n, h, d, generator=gen, dtype=dtype) * 0.5 for n in lengths] for h in (H, Hkv, Hkv, H)]
            q0, k0, v0, w = (layout.shard(x, g.index) for x in full)
            gdn0 = None
            if any(m in GDN_FORMS for m in args.methods):  # q, k L2-normalised; log decay g <= 0; beta in (0, 1)
                gates = [(torch.nn.functional.logsigmoid(torch.randn(n, H, generator=gen, dtype=dtype) + 3),
                          torch.sigmoid(torch.randn(n, H, generator=gen, dtype=dtype))) for n in lengths]
                unit = torch.nn.functional.normalize
                gdn0 = (unit(q0, dim=-1), unit(every_head(k0), dim=-1), every_head(v0),
                        *(layout.shard([x[i] for x in gates], g.index) for i in (0, 1)))
            outputs: dict[str, torch.Tensor] = {}
            steps = {}
            for method in args.methods:
                if method in HEAD_SHARDED and H % world:
                    continue
                if L > args.softmax_max_len and method in SOFTMAX:
                    continue
                if method == "deepspeed" and case != "one":  # its local attention knows no sequence boundaries
                    continue
                steps[method] = make_step(method, layout, q0, k0, v0, w, gdn0)
            times: dict[str, list[float]] = {m: [] for m in steps}
            sent: dict[str, float] = {}
            # round-robin over the methods, so that every method sees the same machine conditions; every
            # other round runs in reverse, so that no method always follows the same one (a method run right
            # after a long, memory-hungry one pays for the memory that one gave back to the system)
            names = list(steps)
            for rep in range(args.repeats + 1):  # the first round is a warm-up
                for method in (names if rep % 2 == 0 else names[::-1]):
                    step = steps[method]
                    C.COUNTERS.reset()
                    dist.barrier()
                    t0 = time.perf_counter()
                    outputs[method] = step()
                    dist.barrier()
                    if rep:
                        times[method].append(time.perf_counter() - t0)
                    sent[method] = C.COUNTERS.total().bytes_sent
            for method, step in steps.items():
                by_rank = gathered(sent[method])
                ops = gathered(aten_ops(step))
                rows.append({
                    "method": method, "length": L, "case": case, "sequences": len(lengths),
                    "time_s": statistics.median(times[method]), "times_s": times[method],
                    "aten_ops": int(max(ops)), "aten_ops_by_rank": [int(x) for x in ops],
                    "bytes_per_rank": None if method == "deepspeed" else max(by_rank),
                    "bytes_per_rank_by_rank": None if method == "deepspeed" else by_rank,
                    "analytic_bytes_per_rank": analytic_bytes(method, lengths, world, H, Hkv, d, elem),
                })
                if method == "gdn_gather":  # the local part alone: this rank's chunks, no communication
                    local = gathered(aten_ops(gdn_step(
                        lambda *x: chunk_gated_delta(*x, layout.chunks, d ** -0.5)[0], gdn0, w)))
                    rows[-1].update(local_aten_ops=int(max(local)), local_aten_ops_by_rank=[int(x) for x in local])
                if rank == 0:
                    print(f"  {method:9s} L={L:>7d} {case:4s} x{len(lengths):<5d} "
                          f"{statistics.median(times[method]):8.3f} s {int(max(ops)):>7d} ops", flush=True)
            if "ulysses" in outputs and "deepspeed" in outputs:
                diff = torch.tensor([(outputs["ulysses"] - outputs["deepspeed"]).abs().max().item()],
                                    dtype=torch.float64)
                dist.all_reduce(diff, op=dist.ReduceOp.MAX)
                for r in rows:
                    if r["length"] == L and r["method"] == "deepspeed":
                        r["max_diff_vs_ulysses"] = float(diff)
    if rank == 0:
        result = summarise(rows, args, world)
        Path(args.out).write_text(strict_dumps(result, indent=1))
        print_table(result)
    dist.barrier()
    dist.destroy_process_group()


def summarise(rows: list[dict[str, Any]], args, world: int) -> dict[str, Any]:
    def row(method, L, case="one"):
        return next((r for r in rows if r["method"] == method and r["length"] == L and r["case"] == case), None)

    def t(method, L):
        r = row(method, L)
        return None if r is None else r["time_s"]

    def time_ratio(a, b):  # {length: time of a / time of b}, one sequence
        return {str(L): t(a, L) / t(b, L) for L in lengths if t(a, L) and t(b, L)}

    def bytes_by_length(method):  # {length: bytes per rank}, one sequence
        return {str(L): row(method, L)["bytes_per_rank"] for L in lengths if row(method, L)}

    lengths = sorted({r["length"] for r in rows})
    lasp2_bytes = bytes_by_length("lasp2")
    ratio_ring = time_ratio("lasp2", "ring")
    ratio_ds = time_ratio("ulysses", "deepspeed")
    diffs = [r["max_diff_vs_ulysses"] for r in rows if "max_diff_vs_ulysses" in r]
    longest = str(max(lengths))
    one_vs_many: dict[str, dict[str, Any]] = {}
    for method in sorted({r["method"] for r in rows}, key=METHODS.index):
        for L in lengths:
            one, many = row(method, L), row(method, L, "many")
            if one and many:
                one_vs_many.setdefault(method, {})[str(L)] = {
                    "sequences": many["sequences"], "ops_one": one["aten_ops"], "ops_many": many["aten_ops"],
                    "ops_many_over_one": many["aten_ops"] / one["aten_ops"],
                    "time_one_s": one["time_s"], "time_many_s": many["time_s"],
                    "time_many_over_one": many["time_s"] / one["time_s"]}
                if method == "gdn_gather":
                    one_vs_many[method][str(L)].update(
                        local_ops_one=one["local_aten_ops"], local_ops_many=many["local_aten_ops"],
                        local_ops_many_over_one=many["local_aten_ops"] / one["local_aten_ops"])
    gdn_bytes = bytes_by_length("gdn_gather")
    elem = 8 if args.dtype == "float64" else 4
    gdn_volume = gdn_gather_volume(world, args.heads, args.head_dim, args.head_dim, elem)
    # the op bounds: one 16K-token sequence against 256 of 64 tokens (else the longest length run)
    gdn_many = one_vs_many.get("gdn_gather", {})
    ops_at = "16384" if "16384" in gdn_many else max(gdn_many, key=int, default=None)
    gdn_ops = None
    if ops_at is not None:
        x = gdn_many[ops_at]
        gdn_ops = {"length": int(ops_at), "sequences_many": x["sequences"], "short": args.short,
                   "bound_ops": GDN_OPS_BOUND, "bound_many_over_one": GDN_OPS_RATIO_BOUND}
        for what in ("", "local_"):  # the operator's step, and its local part alone
            gdn_ops.update({f"{what}ops_one": x[f"{what}ops_one"], f"{what}ops_many": x[f"{what}ops_many"],
                            f"{what}ops_many_over_one": x[f"{what}ops_many_over_one"],
                            f"{what}ops_within_bound": max(x[f"{what}ops_one"], x[f"{what}ops_many"]) <= GDN_OPS_BOUND,
                            f"{what}ratio_within_bound": x[f"{what}ops_many_over_one"] <= GDN_OPS_RATIO_BOUND})
    return {
        "benchmark": "comm",
        "world": world, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
        "dtype": args.dtype, "repeats": args.repeats, "lengths": lengths, "short": args.short, "backend": "gloo",
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
            "one_vs_many": one_vs_many,
            "gdn_gather_bytes_per_rank": gdn_bytes,
            "gdn_gather_bytes_constant": len(set(gdn_bytes.values())) == 1 if gdn_bytes else None,
            "gdn_gather_analytic_bytes_per_sequence": {
                **gdn_volume, "formula": "forward heads x dk x (dk + dv) x bytes x (world - 1), "
                                         "backward heads x dk x dv x bytes x (world - 1)",
                "heads": args.heads, "dk": args.head_dim, "dv": args.head_dim, "bytes": elem},
            "gdn_gather_bytes_equal_analytic": all(b == gdn_volume["total"] for b in gdn_bytes.values())
            if gdn_bytes else None,
            "gdn_heads_bytes_per_rank": bytes_by_length("gdn_heads"),
            "gdn_gather_over_heads_time": time_ratio("gdn_gather", "gdn_heads"),
            "gdn_gather_over_ring_time": time_ratio("gdn_gather", "gdn_ring"),
            "gdn_ops": gdn_ops,
        },
    }


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"SP attention, world {result['world']} (gloo), {result['heads']} heads x {result['head_dim']}, "
                    f"{result['dtype']}: forward+backward, median of {result['repeats']}", title_justify="left")
    for col in ("method", "length", "case", "time s", "aten ops", "bytes/rank", "analytic", "note"):
        t.add_column(col, justify="left" if col in ("method", "case", "note") else "right")
    for r in result["rows"]:
        note = f"max diff {r['max_diff_vs_ulysses']:.1e}" if "max_diff_vs_ulysses" in r else \
            f"local part {r['local_aten_ops']:,} ops" if "local_aten_ops" in r else ""
        case = "1 seq" if r["case"] == "one" else f"{r['sequences']} x {result['short']}"
        t.add_row(r["method"], str(r["length"]), case, f"{r['time_s']:.3f}", f"{r['aten_ops']:,}",
                  "-" if r["bytes_per_rank"] is None else f"{r['bytes_per_rank']:,.0f}",
                  f"{r['analytic_bytes_per_rank']:,.0f}", note)
    Console().print(t)
    s = result["summary"]
    if s["one_vs_many"]:
        m = Table(title="one sequence against many short ones of the same tokens (many / one)", title_justify="left")
        for col in ("method", "length", "sequences", "ops one", "ops many", "ops ratio", "time one s", "time many s",
                    "time ratio"):
            m.add_column(col, justify="left" if col == "method" else "right")
        for method, by_len in s["one_vs_many"].items():
            for L, x in by_len.items():
                m.add_row(method, L, str(x["sequences"]), f"{x['ops_one']:,}", f"{x['ops_many']:,}",
                          f"{x['ops_many_over_one']:.2f}", f"{x['time_one_s']:.3f}", f"{x['time_many_s']:.3f}",
                          f"{x['time_many_over_one']:.2f}")
        Console().print(m)
    Console().print(f"LASP-2 bytes/rank by length: {s['lasp2_bytes_per_rank']}; LASP-2 / ring time: "
                    f"{_rounded(s['lasp2_over_ring_time'])}; Ulysses / DeepSpeed time: "
                    f"{_rounded(s['ulysses_over_deepspeed_time_by_length'])}, "
                    f"max diff {s['ulysses_vs_deepspeed_max_diff']}")
    if s["gdn_gather_bytes_per_rank"] or s["gdn_ops"]:
        v, o = s["gdn_gather_analytic_bytes_per_sequence"], s["gdn_ops"]
        Console().print(
            f"Gated delta ({result['heads']} heads, dk = dv = {result['head_dim']}): gather bytes/rank by length "
            f"{s['gdn_gather_bytes_per_rank']} (constant: {s['gdn_gather_bytes_constant']}; analytic per sequence "
            f"{v['forward']:,} forward + {v['backward']:,} backward = {v['total']:,}, equal: "
            f"{s['gdn_gather_bytes_equal_analytic']}); head all-to-all bytes/rank {s['gdn_heads_bytes_per_rank']}; "
            f"gather / heads time {_rounded(s['gdn_gather_over_heads_time'])}; gather / ring time "
            f"{_rounded(s['gdn_gather_over_ring_time'])}")
        if o:
            Console().print(
                f"Gated delta gather ops at {o['length']} tokens, one sequence / {o['sequences_many']} x "
                f"{o['short']}: operator {o['ops_one']:,} / {o['ops_many']:,} (many/one {o['ops_many_over_one']:.2f}), "
                f"local part {o['local_ops_one']:,} / {o['local_ops_many']:,} (many/one "
                f"{o['local_ops_many_over_one']:.2f}); bounds <= {o['bound_ops']:,} ops: operator "
                f"{o['ops_within_bound']}, local {o['local_ops_within_bound']}; ratio <= {o['bound_many_over_one']}: "
                f"operator {o['ratio_within_bound']}, local {o['local_ratio_within_bound']}")


def _rounded(by_length: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in by_length.items()}


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
    p.add_argument("--short", type=int, default=64)
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
