"""The RL workers, as Ray actors: rollout, reward, reference and trainer, joined by the
TransferQueue (rl/transfer_queue.py). Each pins its torch threads.

Sample fields in the queue:
    prompt, response, behav_logp, version, group     written by rollout (a whole group at a time)
    reward                                           written by reward (None: skipped, logged)
    ref_logp                                         written by reference
"""
from __future__ import annotations

import importlib
import sys
import time
import traceback
from typing import Any, Callable

import ray
import torch

from pliant.runtime.generate import Decoder, Request
from pliant.runtime.model import LM

from .grpo import group_advantages, policy_loss, response_logprobs
from .spec import RLSpec
from .task import EOS, CopyTask, Prompt, sft_batch
from .transfer_queue import TransferQueue

ROLLOUT_FIELDS = ["prompt", "response", "behav_logp", "version", "group"]
TRAIN_FIELDS = ROLLOUT_FIELDS + ["reward", "ref_logp"]
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_model(model_spec, seed: int) -> LM:
    torch.manual_seed(seed)
    return LM(model_spec).to(dtype=DTYPES[model_spec.dtype])


def load_reward_fn(path: str) -> Callable[[Prompt, list[int]], float]:
    """`module:function`, e.g. pliant.rl.task:reward."""
    module, _, name = path.partition(":")
    if not name:
        raise ValueError(f"rl.reward_fn must be 'module:function', got {path!r}")
    return getattr(importlib.import_module(module), name)


def log(msg: str) -> None:
    print(f"pliant rl: {msg}", file=sys.stderr, flush=True)


class _Timed:
    """Busy and idle seconds of a worker (idle: waiting for weights, samples or admission)."""

    def __init__(self):
        self.idle = 0.0
        self.started = time.perf_counter()

    def wait(self, fn, *args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.idle += time.perf_counter() - t

    def report(self) -> dict[str, float]:
        wall = time.perf_counter() - self.started
        return {"wall_s": wall, "idle_s": self.idle, "idle_fraction": self.idle / wall if wall else 0.0}


def consume(tq: TransferQueue, task: str, fields: list[str], max_n: int, timer: _Timed):
    """Batches of up to max_n samples for `task` as they become ready, until the queue is
    closed and nothing is left (waiting counts as idle)."""
    while True:
        batch = timer.wait(tq.get, task, fields, 1, max_n, 0.5)
        if batch.ids:
            yield batch
        elif tq.is_closed():
            return


@ray.remote
class RolloutWorker:
    def __init__(self, worker: int, model_spec, rl: RLSpec, max_prompt: int, max_response: int, threads: int,
                 seed: int):
        torch.set_num_threads(threads)
        self.worker, self.rl = worker, rl
        self.model = build_model(model_spec, seed).eval()
        self.max_prompt, self.max_response = max_prompt, max_response
        self.gen = torch.Generator().manual_seed(seed * 1000 + worker)
        self.version = -1
        self.timer = _Timed()
        self.samples = 0

    def _load(self, store, newer_than: int, timeout: float | None) -> None:
        version, wrapped = ray.get(store.latest.remote(newer_than, timeout))
        if version > self.version:
            self.model.load_state_dict(ray.get(wrapped[0]))
            self.version = version

    def run(self, tq: TransferQueue, dispatcher, store) -> dict[str, Any]:
        rl = self.rl
        self.timer.wait(self._load, store, -1, None)
        dec = Decoder(self.model, rl.rollout_slots, self.max_prompt + self.max_response, EOS, rl.temperature,
                      self.gen)
        groups: dict[int, dict[str, Any]] = {}
        done, steps = False, 0
        while True:
            if steps % 4 == 0:
                self._load(store, self.version, 0)  # newer weights, between decode steps
            while not done and dec.free_slots() >= rl.group_size:
                r = ray.get(dispatcher.next.remote(self.worker, self.version))
                if r.get("done"):
                    done = True
                elif "wait" in r:
                    if dec.active():
                        break  # keep decoding; ask again later
                    self.timer.wait(self._load, store, r["wait"] - 1, None)  # nothing to do until then
                else:
                    g, p = r["group"], r["prompt"]
                    groups[g] = {"step": r["step"], "prompt": p, "version": self.version, "done": []}
                    for j in range(rl.group_size):
                        dec.add(Request(p.tokens, self.max_response, tag=g))
            if not dec.active():
                if done:
                    break
                continue
            steps += 1
            for c in dec.step():
                grp = groups[c.tag]
                grp["done"].append(c)
                if len(grp["done"]) == rl.group_size:
                    self._write(tq, dispatcher, c.tag, groups.pop(c.tag))
        return {"worker": self.worker, "samples": self.samples, **self.timer.report()}

    def _write(self, tq: TransferQueue, dispatcher, group: int, grp: dict[str, Any]) -> None:
        n = self.rl.group_size
        ids = self.timer.wait(tq.allocate, n, partition=grp["step"], group_size=n)
        cs = grp["done"]
        tq.put(ids, {"prompt": [grp["prompt"]] * n, "response": [c.response for c in cs],
                     "behav_logp": [torch.tensor(c.logprobs, dtype=torch.float64) for c in cs],
                     "version": [grp["version"]] * n, "group": [group] * n})
        dispatcher.written_group.remote(self.worker, group)
        self.samples += n


@ray.remote
class RewardWorker:
    def __init__(self, reward_fn: str, threads: int):
        torch.set_num_threads(threads)
        self.fn = load_reward_fn(reward_fn)
        self.skipped: list[dict] = []

    def score(self, prompt: Prompt, response: list[int]) -> float | None:
        try:
            return float(self.fn(prompt, response))
        except Exception as e:  # noqa: BLE001 (a user's reward function: log it, skip the sample)
            self.skipped.append({"prompt": prompt.uid, "error": f"{type(e).__name__}: {e}"})
            log(f"reward function raised on prompt {prompt.uid}: {type(e).__name__}: {e}; the sample is skipped\n"
                + traceback.format_exc(limit=2))
            return None

    def run(self, tq: TransferQueue) -> dict[str, Any]:
        timer, n = _Timed(), 0
        for batch in consume(tq, "reward", ["prompt", "response"], 256, timer):
            tq.put(batch.ids, {"reward": [self.score(p, r) for p, r in zip(batch.data["prompt"],
                                                                            batch.data["response"])]})
            n += len(batch)
        return {"scored": n, "skipped": self.skipped, **timer.report()}


@ray.remote
class ReferenceWorker:
    """Log-probs of the frozen initial policy (the warm-started one), for the KL term."""

    def __init__(self, model_spec, threads: int, seed: int):
        torch.set_num_threads(threads)
        self.model = build_model(model_spec, seed).eval()

    def run(self, tq: TransferQueue, store) -> dict[str, Any]:
        timer, n = _Timed(), 0
        _, wrapped = timer.wait(ray.get, store.latest.remote(-1, None))  # version 0: the initial policy
        self.model.load_state_dict(ray.get(wrapped[0]))
        for batch in consume(tq, "reference", ["prompt", "response"], 64, timer):
            prompts, responses = batch.data["prompt"], batch.data["response"]
            out: list = [None] * len(batch)
            keep = [i for i, r in enumerate(responses) if r]
            if keep:
                with torch.no_grad():
                    lps = response_logprobs(self.model, [prompts[i].tokens for i in keep], [responses[i] for i in keep])
                for i, lp in zip(keep, lps):
                    out[i] = lp.to(torch.float64)
            tq.put(batch.ids, {"ref_logp": out})
            n += len(batch)
        return {"scored": n, **timer.report()}


@ray.remote(max_concurrency=2)  # run() and progress() side by side
class Trainer:
    def __init__(self, model_spec, rl: RLSpec, sft_task: CopyTask, threads: int, seed: int):
        """`sft_task`: the supervised examples' stream (its own seed, apart from the RL prompts)."""
        torch.set_num_threads(threads)
        self.rl, self.sft_task = rl, sft_task
        self.model = build_model(model_spec, seed)
        self.version = 0
        self.steps: list[dict[str, Any]] = []
        self.trained_groups: dict[int, int] = {}
        self.duplicates = 0
        self.skipped: list[dict] = []

    # ----- warm start -----
    def warm_start(self, state: dict | None = None) -> tuple[dict, list[float]]:
        """Supervised steps on the task (or a given state); returns the state and the losses."""
        losses: list[float] = []
        if state is not None:
            self.model.load_state_dict(state)
            return state, losses
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.rl.sft_lr)
        for _ in range(self.rl.sft_steps):
            seqs, plens = sft_batch(self.sft_task, self.rl.sft_batch)
            prompts = [s[:p].tolist() for s, p in zip(seqs, plens)]
            answers = [s[p:].tolist() for s, p in zip(seqs, plens)]
            lps = response_logprobs(self.model, prompts, answers)
            loss = -torch.cat(lps).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}, losses

    def publish(self, store) -> None:
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        ray.get(store.publish.remote(self.version, [ray.put(state)]))

    # ----- RL -----
    def run(self, tq: TransferQueue, store, sync: bool) -> dict[str, Any]:
        rl = self.rl
        opt = torch.optim.AdamW(self.model.parameters(), lr=rl.lr, weight_decay=rl.weight_decay)
        timer = _Timed()
        self.publish(store)
        per_step = rl.samples_per_step
        take = per_step if sync else rl.micro_batch_groups * rl.group_size
        for step in range(rl.steps):
            t0 = time.perf_counter()
            seen_groups: set[int] = set()
            rewards, staleness, weights, tokens, kls, trained = [], [], [], 0, [], 0
            opt.zero_grad()
            while len(seen_groups) < rl.prompts_per_step:
                want = min(take, (rl.prompts_per_step - len(seen_groups)) * rl.group_size)
                batch = timer.wait(tq.get, "trainer", TRAIN_FIELDS, want, want, 1.0, True, step)
                if not batch.ids:
                    continue
                d = batch.data
                fresh = [i for i in range(len(batch)) if d["group"][i] not in self.trained_groups]
                dup_groups = {d["group"][i] for i in range(len(batch))} - {d["group"][i] for i in fresh}
                self.duplicates += len(batch) - len(fresh)
                seen_groups |= dup_groups
                for g in {d["group"][i] for i in fresh}:
                    members = [i for i in fresh if d["group"][i] == g]
                    seen_groups.add(g)
                    self.trained_groups[g] = step
                    stats = self._train_group(d, members, step, per_step)
                    if stats is None:
                        continue
                    rewards += stats["rewards"]
                    staleness += stats["staleness"]
                    weights += stats["is_weights"]
                    tokens += stats["tokens"]
                    kls.append(stats["kl"])
                    trained += len(stats["rewards"])
            if rl.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), rl.grad_clip)
            opt.step()
            self.version = step + 1
            self.publish(store)
            tq.clear_partition(step)
            q = tq.stats()
            self.steps.append({"step": step, "version": self.version, "wall": time.time(),
                               "seconds": time.perf_counter() - t0, "samples": trained, "tokens": tokens,
                               "reward": sum(rewards) / len(rewards) if rewards else None,
                               "max_staleness": max(staleness) if staleness else 0, "staleness": staleness,
                               "is_weight_min": min(weights) if weights else None,
                               "is_weight_max": max(weights) if weights else None,
                               "kl": sum(kls) / len(kls) if kls else 0.0, "queue_held": q["held"]})
        return {"steps": self.steps, "trained_groups": self.trained_groups, "duplicates": self.duplicates,
                "skipped": self.skipped, **timer.report()}

    def _train_group(self, d: dict[str, list], members: list[int], step: int, per_step: int) -> dict | None:
        ok = []
        for i in members:
            if not d["response"][i]:
                self.skipped.append({"group": d["group"][i], "why": "empty response"})
                log(f"sample of group {d['group'][i]} has an empty response; skipped")
            elif d["reward"][i] is None:
                self.skipped.append({"group": d["group"][i], "why": "no reward"})
            else:
                ok.append(i)
        if len(ok) < 2:
            return None
        rewards = torch.tensor([d["reward"][i] for i in ok], dtype=torch.float64)
        adv = group_advantages(rewards, len(ok))
        lps = response_logprobs(self.model, [d["prompt"][i].tokens for i in ok], [d["response"][i] for i in ok])
        lps = [lp.to(torch.float64) for lp in lps]
        versions = [d["version"][i] for i in ok]
        loss, stats = policy_loss(lps, [d["behav_logp"][i] for i in ok], [d["ref_logp"][i] for i in ok], adv,
                                  versions, step, per_step, self.rl.clip_eps, self.rl.kl_coef, self.rl.is_cap)
        loss.backward()
        return {"rewards": rewards.tolist(), "staleness": [step - v for v in versions],
                "is_weights": stats.is_weights, "kl": stats.kl,
                "tokens": sum(len(d["prompt"][i].tokens) + len(d["response"][i]) for i in ok)}

    def progress(self) -> list[dict[str, Any]]:
        return list(self.steps)
