"""The scoring workers, as Ray actors: reward (the user's function on each response) and
reference (log-probs of the frozen initial policy, for the KL term). Each reads whole
groups from the TransferQueue as they become ready and writes its one field back:

    reward      written by the reward worker (None: the function raised; the sample is skipped, logged)
    ref_logp    written by the reference worker

Log-probs travel as lists of float (exact float64 values): a list pickles in microseconds, a
torch tensor in a hundred, and every field is pickled at each hop through a storage unit.
"""
from __future__ import annotations

import traceback
from dataclasses import replace
from typing import Any

import ray
import torch

from pliant.runtime.hf import DTYPES, build_model

from .common import Timed, actor_device, log
from .weights import load_weights
from .grpo import response_logprobs
from .reward import load_reward_fn
from .sample import from_columns, to_columns
from .spec import RLSpec
from .task_protocol import Prompt
from .transfer_queue import TransferQueue


def consume(tq: TransferQueue, task: str, fields: list[str], rl: RLSpec, timer: Timed):
    """Batches of up to rl.score_batch_groups whole groups' samples for `task` as they become ready
    (lingering up to rl.score_linger_s for a full one), until the queue is closed and nothing
    is left (waiting counts as idle). A batch's done_reading goes with the next claim."""
    while True:
        batch = timer.wait(tq.get, task, fields, 1, rl.score_batch_groups * rl.group_size, 0.5, True,
                           linger_s=rl.score_linger_s, ack_later=True)
        if batch.ids:
            yield batch
        elif tq.is_closed():
            return


@ray.remote
class RewardWorker:
    """The user's reward function `module:function(sample) -> float` (rl.reward_fn) on each
    response, with the task's view of it (prompt and response text, ids, the dataset row)."""

    def __init__(self, rl: RLSpec, task, threads: int):
        torch.set_num_threads(threads)
        self.rl, self.task, self.fn = rl, task, load_reward_fn(rl.reward_fn)
        self.skipped: list[dict] = []

    def score(self, prompt: Prompt, response: list[int]) -> float | None:
        try:
            return float(self.fn(self.task.reward_sample(prompt, response)))
        except Exception as e:  # noqa: BLE001 (a user's reward function: log it, skip the sample)
            self.skipped.append({"prompt": prompt.uid, "error": f"{type(e).__name__}: {e}"})
            log(f"reward function raised on prompt {prompt.uid}: {type(e).__name__}: {e}; the sample is skipped\n"
                + traceback.format_exc(limit=2))
            return None

    def run(self, tq: TransferQueue) -> dict[str, Any]:
        timer, n = Timed(), 0
        for batch in consume(tq, "reward", ["prompt", "response"], self.rl, timer):
            scored = [replace(smp, reward=self.score(smp.prompt, smp.response)) for smp in from_columns(batch.data)]
            tq.put(batch.ids, to_columns(scored, ["reward"]))
            n += len(batch)
        return {"scored": n, "skipped": self.skipped, **timer.report()}


@ray.remote
class ReferenceWorker:
    """Log-probs of the frozen initial policy (the warm-started one), for the KL term."""

    def __init__(self, model_spec, rl: RLSpec, threads: int, seed: int):
        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        self.model = build_model(model_spec, actor_device(), DTYPES[model_spec.dtype]).eval()
        self.rl = rl

    def run(self, tq: TransferQueue, wrapped: list) -> dict[str, Any]:
        """`wrapped`: [the warm start's packed weights] (a resumed run's learner starts from
        later ones, so the reference does not come from the weight store)."""
        timer, n = Timed(), 0
        load_weights(self.model, ray.get(wrapped[0]))
        for batch in consume(tq, "reference", ["prompt", "response", "group"], self.rl, timer):
            samples = from_columns(batch.data)
            by_group: dict[int, list] = {}
            for smp in samples:
                if smp.response:  # an empty response keeps ref_logp None
                    by_group.setdefault(smp.group, []).append(smp)
            # one forward per group, its samples in one order: a group's log-probs do not
            # depend on which other groups shared its batch or the order its samples finished
            # in (a packed forward's sums change with its layout, in the last bits), so every
            # run, resumed or not, scores a group alike
            for members in by_group.values():
                members.sort(key=lambda smp: smp.response)
                with torch.no_grad():
                    lps = response_logprobs(self.model, [list(smp.prompt.tokens) for smp in members],
                                            [smp.response for smp in members], self.rl.temperature)
                for smp, lp in zip(members, lps):
                    smp.ref_logp = lp.tolist()
            tq.put(batch.ids, to_columns(samples, ["ref_logp"]))
            n += len(batch)
        return {"scored": n, **timer.report()}
