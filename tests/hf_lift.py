"""transformers' Qwen3.5 with its float32 casts lifted, for float64 equivalence tests.

transformers rounds to float32 inside Qwen3.5's layers in places (the gated delta rule's
inputs, the decay g, the RMSNorms). In float64 those roundings (~1e-7) would hide any
difference the tests look for, so a test lifts them on both sides, pliant's ranks and the
reference alike: the same source with float32 read as float64. Nothing else changes.
"""
from __future__ import annotations

import inspect
import textwrap


def _lifted(fn, namespace: dict):
    src = textwrap.dedent(inspect.getsource(fn))
    src = "\n".join(line for line in src.splitlines() if not line.lstrip().startswith("@"))
    src = src.replace("torch.float32", "torch.float64").replace(".float()", ".double()")
    scope: dict = {}
    exec(compile(src, f"<{fn.__qualname__}, float32 lifted>", "exec"), namespace, scope)  # noqa: S102
    return scope[fn.__name__]


def lift_qwen3_5() -> None:
    """Patch transformers' Qwen3.5 module in this process (idempotent)."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as mq

    if getattr(mq, "_pliant_lifted", False):
        return
    ns = vars(mq)
    rule = inspect.getclosurevars(type(mq.torch_chunk_gated_delta_rule).forward).nonlocals["func"]
    mq.torch_chunk_gated_delta_rule = _lifted(rule, ns)
    for cls in (mq.Qwen3_5GatedDeltaNet, mq.Qwen3_5RMSNormGated, mq.Qwen3_5RMSNorm):
        cls.forward = _lifted(cls.forward, ns)
    mq._pliant_lifted = True


def lifted_hf_model_grads(ctx, model_dir, lengths, groups, seed):
    """dist_jobs.hf_model_grads with the casts lifted on this rank."""
    from dist_jobs import hf_model_grads

    lift_qwen3_5()
    return hf_model_grads(ctx, model_dir, lengths, groups, seed)
