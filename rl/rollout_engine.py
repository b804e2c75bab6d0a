"""The rollout engine interface: what a rollout worker drives to turn prompts into sampled
responses, and the built-in engine that implements it.

A rollout worker (rl/rollout.py) owns admission, staleness and the queue; the engine only
generates. Its shape is a continuous-batching engine's (vLLM's `LLMEngine` has the same one:
`add_request`, `step`, `has_unfinished_requests`), so an external engine attaches with a
thin adapter:

    add(request)            queue one prompt (Request: prompt ids, max_new_tokens, tag, and
                            seed: the response's own sampling stream, as vLLM's per-request
                            seed; the worker gives each response of group g the seed
                            sample_seed(run seed, g, j), so a group regenerated after a
                            restart or on another worker samples what it did)
    free_slots() -> int     how many more requests it takes now (the worker adds a whole
                            GRPO group at a time, so it asks before adding)
    active() -> int         requests in flight
    step() -> [Completion]  advance every request by one decode step (an engine may do more);
                            return the ones that finished, with the tag, the response ids
                            (stop token included when generated) and the log-probability of
                            each response token under the distribution it was sampled from
    load_weights(packed, version)
                            the learner's new weights (rl/weights.py: byte arrays, buckets of
                            the model's state_dict tensors in order, `load_weights` reads
                            them into a model); taken between steps, so
                            requests in flight go on under the new weights, their earlier
                            tokens keeping the log-probs they were sampled with

The log-probs matter: the learner's importance weight for a stale sample is pi_prox /
pi_behav with pi_behav these numbers, so an engine must report the sampling distribution's
own (after temperature), not recompute them.

`rl.rollout_engine: builtin` is pliant's own decoder (runtime/generate.py: pliant's model or
a Hugging Face one, KV cache, continuous batching). Any other value is `module:function` (or
`path/to/file.py:function`), a factory called as `factory(model_spec=..., rl=..., task=...,
seed=..., worker=...)` in the rollout worker's process, returning an object with the methods
above: the place to put a vLLM or SGLang adapter where those run.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

from pliant.runtime.generate import Completion, Request, make_decoder
from pliant.runtime.hf import DTYPES, build_model

from .common import actor_device
from .weights import load_weights
from .reward import load_function
from .spec import RLConfigError

BUILTIN = "builtin"


@runtime_checkable
class RolloutEngine(Protocol):
    def add(self, request: Request) -> None: ...

    def free_slots(self) -> int: ...

    def active(self) -> int: ...

    def step(self) -> list[Completion]: ...

    def load_weights(self, packed: list[np.ndarray], version: int) -> None: ...


class BuiltinEngine:
    """pliant's decoder over the policy (pliant's model or a Hugging Face directory), on the
    device Ray gave the worker."""

    def __init__(self, model_spec, rl, task, seed: int, worker: int):
        device = actor_device()
        torch.manual_seed(seed)
        self.model = build_model(model_spec, device, DTYPES[model_spec.dtype]).eval()
        gen = torch.Generator(device=device).manual_seed(seed * 1000 + worker)
        self.decoder = make_decoder(self.model, rl.rollout_slots, task.max_prompt() + task.max_response(),
                                    task.stop_tokens, rl.temperature, gen)

    def add(self, request: Request) -> None:
        self.decoder.add(request)

    def free_slots(self) -> int:
        return self.decoder.free_slots()

    def active(self) -> int:
        return self.decoder.active()

    def step(self) -> list[Completion]:
        return self.decoder.step()

    def load_weights(self, packed: list[np.ndarray], version: int) -> None:
        load_weights(self.model, packed)


def build_engine(model_spec, rl, task, seed: int, worker: int) -> RolloutEngine:
    if rl.rollout_engine == BUILTIN:
        return BuiltinEngine(model_spec, rl, task, seed, worker)
    factory = load_function(rl.rollout_engine, "rl.rollout_engine")
    engine = factory(model_spec=model_spec, rl=rl, task=task, seed=seed, worker=worker)
    missing = [m for m in ("add", "free_slots", "active", "step", "load_weights") if not callable(getattr(engine, m, None))]
    if missing:
        raise RLConfigError(f"rl.rollout_engine {rl.rollout_engine!r} returned a {type(engine).__name__} without "
                            f"{', '.join(missing)} (see pliant.rl.rollout_engine.RolloutEngine)")
    return engine
