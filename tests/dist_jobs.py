"""Jobs the distributed test pool runs on every rank (see dist_pool.py)."""
from __future__ import annotations

import contextlib
import os

import torch

from pliant.comm.counters import COUNTERS
from pliant.comm.pack import PackLayout


def make_inputs(lengths, heads, kv_heads, dk, dv, seed, dtype=torch.float64):
    """Full sequences, identical on every rank and in the test process."""
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    for L in lengths:
        q = torch.randn(L, heads, dk, generator=gen, dtype=dtype)
        k = torch.randn(L, kv_heads, dk, generator=gen, dtype=dtype)
        v = torch.randn(L, kv_heads, dv, generator=gen, dtype=dtype)
        w = torch.randn(L, heads, dv, generator=gen, dtype=dtype)  # loss weights: loss = sum(o * w)
        seqs.append((q, k, v, w))
    return seqs


def run_op(ctx, method, lengths, start, size, heads, kv_heads, dk, dv, seed, decay, options=None):
    """Run one SP operator on this rank's chunks; return (index, out, dq, dk, dv, counters) or None off-group."""
    if not start <= ctx.rank < start + size:
        return None
    import pliant.comm as C
    from pliant.comm.linear_local import default_decay_rates

    options = dict(options or {})
    kernels = options.pop("kernels", None)  # "reference": the fused paths, with the kernels' contracts in torch
    g = ctx.registry.get(start, size)
    layout = PackLayout.from_lengths(lengths, size)
    seqs = make_inputs(lengths, heads, kv_heads, dk, dv, seed)
    q, k, v, w = (layout.shard([s[i] for s in seqs], g.index) for i in range(4))
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    COUNTERS.reset()
    if kernels == "reference":
        from kernel_references import fla_simple_gla_varlen, flash_varlen
        chosen = C.use_kernels(linear=fla_simple_gla_varlen, softmax=flash_varlen)
    else:
        chosen = contextlib.nullcontext()
    with chosen:
        if method == "lasp2":
            rates = default_decay_rates(heads) if decay else None
            out = C.lasp2_attention(q, k, v, layout, g, rates, **options)
        elif method == "ring":
            rates = default_decay_rates(heads) if decay else None
            out = C.ring_attention(q, k, v, layout, g, rates, **options)
        elif method == "ulysses":
            out = C.ulysses_attention(q, k, v, layout, g, **options)
        elif method == "lasp2h":
            out = C.lasp2h_attention(q, k, v, layout, g, **options)
        else:
            raise ValueError(method)
        (out * w).sum().backward()  # padding rows of w are zero: padding never reaches the loss
    return g.index, out.detach(), q.grad, k.grad, v.grad, COUNTERS.snapshot()


def call(ctx, start, size, what):
    """Run one bad-input scenario on the ranks of a group; return the error text (or 'ok')."""
    import pliant.comm as C

    try:
        if what in ("not_in_group", "unknown_layout"):  # every rank asks for ranks [start, start+size)
            ctx.registry.get(start, size)
            return "ok"
        if not start <= ctx.rank < start + size:
            return None
        g = ctx.registry.get(start, size)
        layout = PackLayout.from_lengths([10, 7], size)
        x = torch.randn(layout.local_tokens, 2, 4, dtype=torch.float64)
        if what == "shape_mismatch":
            heads = 2 if g.index == 0 else 3  # rank 0 of the group disagrees with the others
            y = torch.randn(layout.local_tokens, heads, 4, dtype=torch.float64)
            C.lasp2_attention(y, y, y, layout, g)
        elif what == "shape_mismatch_unchecked":
            C.set_metadata_check(False)
            try:
                C.lasp2_attention(x, x, x, layout, g)
            finally:
                C.set_metadata_check(True)
        elif what == "int_dtype":
            xi = torch.ones(layout.local_tokens, 2, 4, dtype=torch.int64)
            C.lasp2_attention(xi, xi, xi, layout, g)
        elif what == "wrong_tokens":
            C.ulysses_attention(x[:-1], x[:-1], x[:-1], layout, g)
        elif what.startswith("one_rank_wrong_tokens:"):  # only the group's last rank is off the layout
            y = torch.randn(layout.local_tokens - (g.index == size - 1), 4, 4, dtype=torch.float64)
            op = what.split(":")[1]
            if op == "gdn":
                from pliant.comm.gated_delta import gated_delta_attention

                gate = torch.zeros(y.shape[:2], dtype=torch.float64)
                gated_delta_attention(y, y, y, gate, gate, layout, g)
            else:
                {"ulysses": C.ulysses_attention, "lasp2h": C.lasp2h_attention, "lasp2": C.lasp2_attention,
                 "ring": C.ring_attention}[op](y, y, y, layout, g)
        elif what == "one_rank_none":  # the group's last rank passes no tensor for v
            C.ulysses_attention(x, x, None if g.index == size - 1 else x, layout, g)
        elif what == "wrong_cu_seqlens":
            C.lasp2h_attention(x, x, x, layout, g, cu_seqlens=torch.tensor([0, 3, layout.local_tokens]))
        elif what == "ulysses_heads":
            y = torch.randn(layout.local_tokens, 3, 4, dtype=torch.float64)
            C.ulysses_attention(y, y, y, layout, g)
        else:
            raise ValueError(what)
        return "ok"
    except Exception as e:  # noqa: BLE001 - returned to the test
        return f"{type(e).__name__}: {e}"


def tiny_spec(heads=4, kv_heads=2, attention=("linear", "linear", "linear", "softmax"), layers=4):
    from pliant.planner.spec import ModelSpec

    return ModelSpec(name="tiny", layers=layers, hidden=32, heads=heads, kv_heads=kv_heads, head_dim=8,
                     ffn_hidden=64, vocab_size=50, attention=list(attention), zero_stage=1, dtype="fp64")


def batch_tokens(lengths, vocab, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (L,), generator=gen) for L in lengths]


def model_grads(ctx, spec_kwargs, lengths, groups, seed):
    """One micro-batch of a plan on this rank: groups = [(start, size, [seq ids])].
    Returns (local loss, flat gradient) normalised by the batch's real targets."""
    from pliant.planner.cost import sp_form
    from pliant.runtime.model import LM, lm_loss_sum
    from pliant.runtime.packing import real_targets, shard_pack

    spec = tiny_spec(**spec_kwargs)
    torch.manual_seed(0)
    model = LM(spec).double()
    seqs = batch_tokens(lengths, spec.vocab_size, seed)
    norm = real_targets([len(s) for s in seqs])
    start, size, ids = next((st, sz, ids) for st, sz, ids in groups if st <= ctx.rank < st + sz)
    g = ctx.registry.get(start, size)
    linear = "lasp2" if spec.linear_sp == "auto" else spec.linear_sp  # auto: LASP-2 unless priced
    pack = shard_pack([seqs[i] for i in ids], g, form=sp_form(size, spec.heads, linear))
    loss = lm_loss_sum(model(pack.tokens, pack.ctx), pack.targets) / norm
    loss.backward()
    flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    return loss.detach(), flat


def record_collectives(ctx, capacity):
    """Issue a mix of collectives under the recorder; return what it saw (as plain tuples)."""
    import torch.distributed as dist

    from pliant.comm.monitor import CollectiveRecorder

    rank, world = ctx.rank, ctx.world
    pair = ctx.registry.get(0, 2) if world >= 2 and rank < 2 else None
    original = dist.all_reduce
    with CollectiveRecorder(capacity=capacity) as rec:
        x = torch.ones(8, dtype=torch.float32)
        dist.all_reduce(x)
        dist.all_to_all_single(torch.empty(4 * world), torch.ones(4 * world))
        work = dist.all_reduce(torch.ones(3, dtype=torch.float64), async_op=True)
        inflight_async = len(rec.inflight)
        work.wait()
        if pair is not None and rank < 2:
            dist.all_reduce(torch.ones(2), group=pair.pg)
            if rank == 0:
                dist.send(torch.ones(5), dst=1)
            else:
                dist.recv(torch.empty(5), src=0)
        rec.mark_step(7)
        dist.barrier()
        snap = rec.snapshot()
    restored = dist.all_reduce is original
    events = [(e.group, e.seq, e.op, e.nbytes, e.dtype, e.shape, e.peer, e.exit is not None and e.exit >= e.enter)
              for e in snap["events"]]  # point-to-point transfers, as rows
    done = {group: [(seq, rec.signatures[sid], step, finite, ckpt, exit_ >= enter)
                    for seq, sid, enter, exit_, step, finite, ckpt in rows]
            for group, rows in snap["done"].items()}  # completed collectives, as the columns' rows
    return {"events": events, "done": done, "inflight_async": inflight_async, "inflight_after": len(snap["inflight"]),
            "step": snap["step"], "restored": restored}


def hf_model_grads(ctx, model_dir, lengths, groups, seed, linear: str = "lasp2"):
    """A Hugging Face model directory under pliant's SP: one micro-batch of a plan on this rank
    (float64), linear layers in the form `linear`. Returns (local loss, {param name: grad}, local logits)."""
    from pliant.planner.cost import sp_form
    from pliant.runtime.hf import load_hf_model
    from pliant.runtime.model import lm_loss_sum
    from pliant.runtime.packing import real_targets, shard_pack

    model = load_hf_model(model_dir, torch.float64).train()  # as training runs it (a mode change keeps pliant's layers)
    seqs = batch_tokens(lengths, model.hf.config.vocab_size, seed)
    norm = real_targets([len(s) for s in seqs])
    start, size, ids = next((st, sz, ids) for st, sz, ids in groups if st <= ctx.rank < st + sz)
    g = ctx.registry.get(start, size)
    pack = shard_pack([seqs[i] for i in ids], g, form=sp_form(size, model.hf.config.num_attention_heads, linear))
    logits = model(pack.tokens, pack.ctx)
    loss = lm_loss_sum(logits, pack.targets) / norm
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.hf.named_parameters()}
    return loss.detach(), grads, logits.detach(), pack.ctx.form.softmax


def save_initial_checkpoint(ctx, config_path, run_dir):
    """Build the trainer of a job config on this pool's ranks and save its step-0 checkpoint
    (the export round trip: the weights exactly as loaded)."""
    from pathlib import Path

    from pliant.config import load_config
    from pliant.runtime.checkpoint import Checkpointer
    from pliant.runtime.trainer import Trainer

    for key, value in (("LOCAL_RANK", ctx.rank), ("RANK", ctx.rank), ("WORLD_SIZE", ctx.world)):
        os.environ.setdefault(key, str(value))  # what torchrun would have set: DeepSpeed reads them
    trainer = Trainer.from_config(load_config(config_path))
    try:
        trainer.save_checkpoint(Checkpointer(Path(run_dir), keep=2))
        return trainer.parameters_vector()
    finally:
        trainer.close()


def count_ops(ctx, method, lengths, heads=4, head_dim=32):
    """aten ops of one forward + backward of an SP operator on this rank (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    import pliant.comm as C
    from pliant.comm.linear_local import default_decay_rates

    g = ctx.registry.get(0, ctx.world)
    layout = PackLayout.from_lengths(lengths, ctx.world)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (layout.shard([torch.randn(n, heads, head_dim, generator=gen) for n in lengths], g.index)
               .requires_grad_(True) for _ in range(3))
    ops = {"lasp2": lambda: C.lasp2_attention(q, k, v, layout, g, default_decay_rates(heads)),
           "ring": lambda: C.ring_attention(q, k, v, layout, g, default_decay_rates(heads)),
           "ulysses": lambda: C.ulysses_attention(q, k, v, layout, g),
           "lasp2h": lambda: C.lasp2h_attention(q, k, v, layout, g)}
    ops[method]().sum().backward()  # first-call work is not the steady state
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ops[method]().sum().backward()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))
