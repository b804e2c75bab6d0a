"""The RL workers, as Ray actors: rollout, reward, reference and trainer, joined by the
TransferQueue (rl/transfer_queue.py). Each pins its torch threads.

Sample fields in the queue:
    prompt, response, behav_logp, version, group,    written by rollout (a whole group at a time)
    written_at
    reward                                           written by reward (None: skipped, logged)
    ref_logp                                         written by reference

Log-probs travel as lists of float (exact float64 values): a list pickles in microseconds, a
torch tensor in a hundred, and every field is pickled at each hop through a storage unit.
"""
from __future__ import annotations

import importlib
import sys
import time
import traceback
from typing import Any, Callable

import ray
import torch

from pliant.runtime.generate import Decoder, Request, generate
from pliant.runtime.model import LM

from .dispatch import load_weights, pack_weights
from .grpo import group_advantages, policy_loss, response_logprobs
from .spec import RLSpec
from .task import EOS, CopyTask, Prompt, reward, sft_batch
from .transfer_queue import TransferQueue

ROLLOUT_FIELDS = ["prompt", "response", "behav_logp", "version", "group", "written_at"]
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


def consume(tq: TransferQueue, task: str, fields: list[str], rl: RLSpec, timer: _Timed):
    """Batches of up to rl.score_batch_groups groups' samples for `task` as they become ready
    (lingering up to rl.score_linger_s for a full one), until the queue is closed and nothing
    is left (waiting counts as idle). A batch's done_reading goes with the next claim."""
    while True:
        batch = timer.wait(tq.get, task, fields, 1, rl.score_batch_groups * rl.group_size, 0.5,
                           linger_s=rl.score_linger_s, ack_later=True)
        if batch.ids:
            yield batch
        elif tq.is_closed():
            return


@ray.remote
class RolloutWorker:
    def __init__(self, worker: int, model_spec, rl: RLSpec, max_prompt: int, max_response: int, threads: int,
                 seed: int, incarnation: int = 0):
        torch.set_num_threads(threads)
        self.worker, self.rl = worker, rl
        self.key = (worker, incarnation)  # the dispatcher's name for this worker (a restart is a new one)
        self.model = build_model(model_spec, seed).eval()
        self.max_prompt, self.max_response = max_prompt, max_response
        self.gen = torch.Generator().manual_seed(seed * 1000 + worker)
        self.version = -1
        self.samples = 0

    def _load(self, reply) -> None:
        version, wrapped = ray.get(reply)
        if version > self.version:
            load_weights(self.model, ray.get(wrapped[0]))
            self.version = version

    def _poll_weights(self, store) -> None:
        """A long poll for weights newer than ours, answered when the trainer publishes;
        `self.arrived` is checked without a call into Ray on every decode step."""
        self.newer = store.latest.remote(self.version, None)
        self.arrived = self.newer.future()

    def _take_weights(self, store, waiting: bool) -> None:
        """Load the polled weights (`waiting`: they have not come yet, the wait counts as
        idle) and poll again."""
        if waiting:
            self.timer.wait(self._load, self.newer)
        else:
            self._load(self.newer)
        self._poll_weights(store)

    def run(self, tq: TransferQueue, dispatcher, store) -> dict[str, Any]:
        rl, n = self.rl, self.rl.group_size
        self.timer = _Timed()  # busy and idle from the run's start
        self.split = {"decode_s": 0.0, "dispatch_s": 0.0, "write_s": 0.0}  # where the busy time goes
        self.landing: list[tuple[Any, int]] = []  # (the queue's answer to a write, its group), in flight
        self.landed: list[int] = []  # groups whose write has landed, not yet reported to the dispatcher
        self.late: list[int] = []  # groups not written (their step was trained already), not yet reported
        self.timer.wait(self._load, store.latest.remote(-1, None))
        dec = Decoder(self.model, rl.rollout_slots, self.max_prompt + self.max_response, EOS, rl.temperature,
                      self.gen)
        groups: dict[int, dict[str, Any]] = {}
        done, wait_for = False, -1  # wait_for: the version admission asked for (no asking again before)
        self._poll_weights(store)
        # the next group is asked for ahead, while decoding goes on: (reply, version asked with);
        # Ray runs one caller's calls to an actor in order and each blocking one costs a
        # process switch, so nothing on the decode loop's path waits for an answer it could
        # have asked for earlier
        asked: tuple[Any, int] | None = None
        while True:
            if self.arrived.done():  # newer weights, taken between decode steps
                self._take_weights(store, waiting=False)
            while not done and dec.free_slots() >= n and self.version >= wait_for:
                t = time.perf_counter()
                if asked is None:
                    asked = (self._ask(dispatcher), self.version)
                r = ray.get(asked[0])
                if "wait" in r and asked[1] < self.version:  # an answer for older weights: ask again
                    r = ray.get(self._ask(dispatcher))
                asked = None
                self.split["dispatch_s"] += time.perf_counter() - t
                if r.get("done"):
                    done = True
                elif "wait" in r:
                    if dec.active():
                        wait_for = r["wait"]
                        break  # keep decoding; ask again once the weights are new enough
                    while self.version < r["wait"]:  # nothing to do until then
                        self._take_weights(store, waiting=True)
                else:
                    g, p = r["group"], r["prompt"]
                    # its queue slots and the next group are asked for now; both answers
                    # come while it decodes
                    groups[g] = {"step": r["step"], "prompt": p, "version": self.version, "done": [],
                                 "ids": tq.allocate(n, r["step"], n, wait=False)}
                    asked = (self._ask(dispatcher), self.version)
                    for j in range(n):
                        dec.add(Request(p.tokens, self.max_response, tag=g))
            if not dec.active():
                if done:
                    break
                if self.version < wait_for:  # nothing to decode until newer weights come: wait for them
                    self._take_weights(store, waiting=True)
                continue
            t = time.perf_counter()
            finished = dec.step()
            t1 = time.perf_counter()
            self.split["decode_s"] += t1 - t
            for c in finished:
                grp = groups[c.tag]
                grp["done"].append(c)
                if len(grp["done"]) == n:
                    self._write(tq, c.tag, groups.pop(c.tag))
            self._check_landed()
            self.split["write_s"] += time.perf_counter() - t1
        self._check_landed(block=True)
        ray.get(dispatcher.written_groups.remote(self.key, self.landed, self.late))
        return {"worker": self.worker, "samples": self.samples, **self.timer.report(),
                **{k: round(v, 4) for k, v in self.split.items()}}

    def _ask(self, dispatcher):
        """Ask the dispatcher for a group, telling it which writes have landed since."""
        landed, late, self.landed, self.late = self.landed, self.late, [], []
        return dispatcher.next.remote(self.key, self.version, landed, late)

    def _write(self, tq: TransferQueue, group: int, grp: dict[str, Any]) -> None:
        n = self.rl.group_size
        ids = self.timer.wait(ray.get, grp["ids"])
        if not ids:  # its step is trained already: a duplicate of a group handed out again
            log(f"rollout worker {self.worker}: group {group} of step {grp['step']} came too late; dropped")
            self.late.append(group)
            return
        cs = grp["done"]
        # the write travels while decoding goes on; it is reported written only once it has
        # landed (_check_landed), so a worker killed mid-write leaves its group to be handed
        # out again
        landed = tq.put(ids, {"prompt": [grp["prompt"]] * n, "response": [c.response for c in cs],
                              "behav_logp": [list(c.logprobs) for c in cs],
                              "version": [grp["version"]] * n, "group": [group] * n,
                              "written_at": [time.time()] * n}, wait=False)
        self.landing.append((landed, group))
        self.samples += n

    def _check_landed(self, block: bool = False) -> None:
        """Move the groups whose write has landed to `self.landed` (raises if a write failed)."""
        if not self.landing:
            return
        refs = [ref for ref, _ in self.landing]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=None if block else 0)
        if not ready:
            return
        ready_set = set(ready)
        ray.get(ready)
        self.landed += [g for ref, g in self.landing if ref in ready_set]
        self.landing = [(ref, g) for ref, g in self.landing if ref not in ready_set]


@ray.remote
class RewardWorker:
    def __init__(self, rl: RLSpec, threads: int):
        torch.set_num_threads(threads)
        self.rl, self.fn = rl, load_reward_fn(rl.reward_fn)
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
        for batch in consume(tq, "reward", ["prompt", "response"], self.rl, timer):
            tq.put(batch.ids, {"reward": [self.score(p, r) for p, r in zip(batch.data["prompt"],
                                                                            batch.data["response"])]})
            n += len(batch)
        return {"scored": n, "skipped": self.skipped, **timer.report()}


@ray.remote
class ReferenceWorker:
    """Log-probs of the frozen initial policy (the warm-started one), for the KL term."""

    def __init__(self, model_spec, rl: RLSpec, threads: int, seed: int):
        torch.set_num_threads(threads)
        self.model = build_model(model_spec, seed).eval()
        self.rl = rl

    def run(self, tq: TransferQueue, store) -> dict[str, Any]:
        timer, n = _Timed(), 0
        _, wrapped = timer.wait(ray.get, store.latest.remote(-1, None))  # version 0: the initial policy
        load_weights(self.model, ray.get(wrapped[0]))
        for batch in consume(tq, "reference", ["prompt", "response"], self.rl, timer):
            prompts, responses = batch.data["prompt"], batch.data["response"]
            out: list = [None] * len(batch)
            keep = [i for i, r in enumerate(responses) if r]
            if keep:
                with torch.no_grad():
                    lps = response_logprobs(self.model, [prompts[i].tokens for i in keep], [responses[i] for i in keep],
                                            self.rl.temperature)
                for i, lp in zip(keep, lps):
                    out[i] = lp.tolist()
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
        # made here, not when the run starts: its first construction imports torch._dynamo (seconds)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=rl.lr, weight_decay=rl.weight_decay)
        self.version = 0
        self.steps: list[dict[str, Any]] = []
        self.unrecorded: list[tuple[dict[str, Any], Any]] = []  # (a finished step's row, its queue stats to come)
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
        # a linear warm-up and the RL grad_clip: without them, some seeds' runs stalled at the
        # unigram loss (2 of 10 seeds at loss ~2 after 400 steps; with them every one ends at 0.33-0.58)
        rl, warmup = self.rl, self.rl.sft_warmup_steps
        opt = torch.optim.AdamW(self.model.parameters(), lr=rl.sft_lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        for _ in range(rl.sft_steps):
            seqs, plens = sft_batch(self.sft_task, rl.sft_batch)
            prompts = [s[:p].tolist() for s, p in zip(seqs, plens)]
            answers = [s[p:].tolist() for s, p in zip(seqs, plens)]
            lps = response_logprobs(self.model, prompts, answers)
            loss = -torch.cat(lps).mean()
            opt.zero_grad()
            loss.backward()
            if rl.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), rl.grad_clip)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}, losses

    def evaluate(self, prompts: list[Prompt], max_response: int, slots: int, seed: int) -> float:
        """The policy's mean exact-match reward on held-out prompts (one sample each, at the
        rollout temperature, seeded): the learning measure that does not depend on the mode."""
        self.model.eval()
        try:
            out = generate(self.model, [Request(p.tokens, max_response, tag=p) for p in prompts], slots, EOS,
                           self.rl.temperature, torch.Generator().manual_seed(seed))
        finally:
            self.model.train()
        return sum(reward(c.tag, c.response) for c in out) / len(out)

    def publish(self, store) -> None:
        """Hand the store this version's weights; the trainer goes on at once (the store keeps
        the newest version whatever order its calls run in)."""
        self.published = store.publish.remote(self.version, [ray.put(pack_weights(self.model))])

    def _record(self, block: bool = False) -> None:
        """Move the finished steps whose queue statistics have come (the answer to the step's
        clear_partition, asked for without waiting) to `self.steps`."""
        while self.unrecorded:
            row, reply = self.unrecorded[0]
            if not block and not ray.wait([reply], timeout=0)[0]:
                return
            _, stats = ray.get(reply)
            row["queue_held"] = stats["held"]
            self.steps.append(row)
            self.unrecorded.pop(0)

    # ----- RL -----
    def run(self, tq: TransferQueue, store, sync: bool) -> dict[str, Any]:
        rl, opt = self.rl, self.opt
        timer = _Timed()
        self.publish(store)
        per_step = rl.samples_per_step
        take = per_step if sync else rl.micro_batch_groups * rl.group_size  # sync: the whole step's batch

        def claim(step: int, groups_left: int):
            """The next batch of `step`, asked for ahead: its claim travels (and waits in the
            controller) while the trainer works on the batch before. Async takes whatever
            whole groups are ready, up to a micro-batch: groups wait for the trainer only
            while it is busy, and a step's last group is all that is left to train once it
            lands (the gradient is the sum over the step's groups, however they are batched)."""
            want = min(take, groups_left * rl.group_size)
            least = want if sync else rl.group_size
            return tq.get_async("trainer", TRAIN_FIELDS, least, want, 1.0, True, step, ack_later=True)

        pending = claim(0, rl.prompts_per_step)
        for step in range(rl.steps):
            t0 = time.perf_counter()
            seen_groups: set[int] = set()
            rewards, staleness, weights, tokens, kls, trained, latency = [], [], [], 0, [], 0, []
            opt.zero_grad()
            while len(seen_groups) < rl.prompts_per_step:
                batch = timer.wait(pending.result)
                if not batch.ids:  # the claim timed out: ask again
                    pending = claim(step, rl.prompts_per_step - len(seen_groups))
                    continue
                d = batch.data
                latency.append(time.time() - d["written_at"][0])  # rollout's write -> trainer's read
                fresh = [i for i in range(len(batch)) if d["group"][i] not in self.trained_groups]
                dup_groups = {d["group"][i] for i in range(len(batch))} - {d["group"][i] for i in fresh}
                self.duplicates += len(batch) - len(fresh)
                seen_groups |= dup_groups
                fresh_groups = list(dict.fromkeys(d["group"][i] for i in fresh))
                seen_groups.update(fresh_groups)
                if len(seen_groups) < rl.prompts_per_step:
                    pending = claim(step, rl.prompts_per_step - len(seen_groups))
                elif step + 1 < rl.steps:  # the next step's first batch (its data does not depend on this update)
                    pending = claim(step + 1, rl.prompts_per_step)
                for j in range(0, len(fresh_groups), rl.micro_batch_groups):  # one forward per micro-batch
                    chunk = fresh_groups[j:j + rl.micro_batch_groups]
                    for g in chunk:
                        self.trained_groups[g] = step
                    members = [[i for i in fresh if d["group"][i] == g] for g in chunk]
                    self.duplicates += sum(max(0, len(m) - rl.group_size) for m in members)
                    stats = self._train_micro_batch(d, [m[:rl.group_size] for m in members], step, per_step)
                    if stats is None:
                        continue
                    rewards += stats["rewards"]
                    staleness += stats["staleness"]
                    weights += stats["is_weights"]
                    tokens += stats["tokens"]
                    kls += stats["kl"]
                    trained += len(stats["rewards"])
            if rl.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), rl.grad_clip)
            opt.step()
            self.version = step + 1
            self.publish(store)
            row = {"step": step, "version": self.version, "wall": time.time(), "seconds": time.perf_counter() - t0,
                   "samples": trained, "tokens": tokens, "reward": sum(rewards) / len(rewards) if rewards else None,
                   "max_staleness": max(staleness) if staleness else 0, "staleness": staleness,
                   "is_weight_min": min(weights) if weights else None,
                   "is_weight_max": max(weights) if weights else None, "kl": sum(kls) / len(kls) if kls else 0.0,
                   "queue_latency_s": max(latency) if latency else None}
            self.unrecorded.append((row, tq.clear_partition(step, wait=False)))
            self._record()
        self._record(block=True)
        ray.get(self.published)
        return {"steps": self.steps, "trained_groups": self.trained_groups, "duplicates": self.duplicates,
                "skipped": self.skipped, **timer.report()}

    def _usable(self, d: dict[str, list], members: list[int]) -> list[int]:
        """The samples of a group that can be trained (logged skips: an empty response, no reward);
        a group needs two to have an advantage."""
        ok = []
        for i in members:
            if not d["response"][i]:
                self.skipped.append({"group": d["group"][i], "why": "empty response"})
                log(f"sample of group {d['group'][i]} has an empty response; skipped")
            elif d["reward"][i] is None:
                self.skipped.append({"group": d["group"][i], "why": "no reward"})
            else:
                ok.append(i)
        return ok if len(ok) >= 2 else []

    def _train_micro_batch(self, d: dict[str, list], groups: list[list[int]], step: int,
                           per_step: int) -> dict | None:
        """Forward and backward of a micro-batch of whole groups in one packed sequence;
        gradients add up over the step."""
        usable = [ok for ok in (self._usable(d, members) for members in groups) if ok]
        if not usable:
            return None
        ok = [i for members in usable for i in members]
        rewards = torch.tensor([d["reward"][i] for i in ok], dtype=torch.float64)
        adv = torch.cat([group_advantages(torch.tensor([d["reward"][i] for i in members], dtype=torch.float64),
                                          len(members)) for members in usable])
        lps = response_logprobs(self.model, [d["prompt"][i].tokens for i in ok], [d["response"][i] for i in ok],
                                self.rl.temperature)  # the sampling distribution's log-probs
        lps = [lp.to(torch.float64) for lp in lps]
        versions = [d["version"][i] for i in ok]
        f64 = torch.float64
        loss, stats = policy_loss(lps, [torch.tensor(d["behav_logp"][i], dtype=f64) for i in ok],
                                  [torch.tensor(d["ref_logp"][i], dtype=f64) for i in ok], adv,
                                  versions, step, per_step, self.rl.clip_eps, self.rl.kl_coef, self.rl.is_cap)
        loss.backward()
        return {"rewards": rewards.tolist(), "staleness": [step - v for v in versions],
                "is_weights": stats.is_weights, "kl": [stats.kl] * len(ok),
                "tokens": sum(len(d["prompt"][i].tokens) + len(d["response"][i]) for i in ok)}

    def progress(self) -> list[dict[str, Any]]:
        return list(self.steps)
