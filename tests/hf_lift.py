"""transformers' Qwen3.5 and Qwen3-Next with their float32 casts lifted, for float64 equivalence tests.

transformers rounds to float32 inside these models' layers in places (the gated delta rule's
inputs, the decay g, the RMSNorms, Qwen3-Next's router softmax). In float64 those roundings (~1e-7) would hide any
difference the tests look for, so a test lifts them on both sides, pliant's ranks and the
reference alike: the same source with float32 read as float64. Nothing else changes.
"""
from __future__ import annotations

import importlib
import inspect
import re
import textwrap


def _lifted(fn, namespace: dict):
    src = textwrap.dedent(inspect.getsource(fn))
    src = "\n".join(line for line in src.splitlines() if not line.lstrip().startswith("@"))
    src = re.sub(r"torch\.float(32)?\b", "torch.float64", src).replace(".float()", ".double()")
    scope: dict = {}
    exec(compile(src, f"<{fn.__qualname__}, float32 lifted>", "exec"), namespace, scope)  # noqa: S102
    return scope[fn.__name__]


LIFTED = {  # module: the classes whose forward rounds to float32
    "qwen3_5": ("Qwen3_5GatedDeltaNet", "Qwen3_5RMSNormGated", "Qwen3_5RMSNorm"),
    "qwen3_next": ("Qwen3NextGatedDeltaNet", "Qwen3NextRMSNormGated", "Qwen3NextRMSNorm", "Qwen3NextTopKRouter"),
}


def lift_hybrids() -> None:
    """Patch transformers' Qwen3.5 and Qwen3-Next modules in this process (idempotent)."""
    for name, classes in LIFTED.items():
        mq = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        if getattr(mq, "_pliant_lifted", False):
            continue
        ns = vars(mq)
        rule = inspect.getclosurevars(type(mq.torch_chunk_gated_delta_rule).forward).nonlocals["func"]
        mq.torch_chunk_gated_delta_rule = _lifted(rule, ns)
        for cls in classes:
            getattr(mq, cls).forward = _lifted(getattr(mq, cls).forward, ns)
        mq._pliant_lifted = True


def lifted_hf_model_grads(ctx, model_dir, lengths, groups, seed, linear: str = "lasp2"):
    """dist_jobs.hf_model_grads with the casts lifted on this rank."""
    from dist_jobs import hf_model_grads

    lift_hybrids()
    return hf_model_grads(ctx, model_dir, lengths, groups, seed, linear)
