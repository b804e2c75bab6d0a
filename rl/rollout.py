"""The rollout worker, a Ray actor: asks the dispatcher for prompt groups (admission within
the staleness bound), generates each group's responses with its rollout engine
(rl/rollout_engine.py), writes whole groups to the TransferQueue, and takes the learner's
newer weights between decode steps.

It writes a whole group at a time: the rollout's fields of each `Sample` (rl/sample.py:
prompt, response, behav_logp, version, group, written_at).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import ray
import torch

from pliant.runtime.generate import Request

from .common import Timed, log
from .rollout_engine import build_engine
from .sample import ROLLOUT_FIELDS, Sample, to_columns
from .spec import RLSpec
from .weights import fetch
from .transfer_queue import TransferQueue


def sample_seed(seed: int, group: int, j: int) -> int:
    """The sampling stream of group `group`'s j-th response in a run of `seed`: a group's
    responses depend on its prompt and the weights alone, whichever worker generates them,
    with whatever else in its batch, before or after a restart (a resumed sync run
    regenerates exactly what the uninterrupted one did)."""
    return int(np.random.SeedSequence([seed, group, j]).generate_state(1, np.uint64)[0])


@ray.remote
class RolloutWorker:
    def __init__(self, worker: int, model_spec, rl: RLSpec, task, threads: int, seed: int, incarnation: int = 0):
        torch.set_num_threads(threads)
        self.worker, self.rl = worker, rl
        self.seed = seed
        self.key = (worker, incarnation)  # the dispatcher's name for this worker (a restart is a new one)
        self.engine = build_engine(model_spec, rl, task, seed, worker)
        self.max_response = task.max_response()
        self.weights = (-1, -1)  # (learner generation, policy version) of the loaded weights
        self.samples = 0
        self.weights_latency_s: list[float] = []  # each load: from the learner's publish to loaded here

    @property
    def version(self) -> int:
        return self.weights[1]

    def _load(self, reply) -> None:
        key, published = ray.get(reply)
        key = tuple(key)
        if key > self.weights:
            self.engine.load_weights(fetch(published), key[1])
            self.weights = key
            self.weights_latency_s.append(time.time() - published.published_at)

    def _poll_weights(self, store) -> None:
        """A long poll for weights newer than ours, answered when the trainer publishes;
        `self.arrived` is checked without a call into Ray on every decode step."""
        self.newer = store.latest.remote(self.weights, None)
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
        n = self.rl.group_size
        self.timer = Timed()  # busy and idle from the run's start
        self.split = {"decode_s": 0.0, "dispatch_s": 0.0, "write_s": 0.0}  # where the busy time goes
        # groups are (group, generation) pairs: a group handed out again by a restarted learner
        # generation is another piece of work than the lost generation's
        self.landing: list[tuple[Any, tuple[int, int]]] = []  # (the queue's answer to a write, its group), in flight
        self.landed: list[tuple[int, int]] = []  # groups whose write has landed, not yet reported to the dispatcher
        self.late: list[tuple[int, int]] = []  # groups not written (their step was trained, or its generation lost)
        self.timer.wait(self._load, store.latest.remote((-1, -1), None))
        dec = self.engine
        groups: dict[tuple[int, int], dict[str, Any]] = {}
        done, wait_for = False, (-1, -1)  # wait_for: the weights admission asked for (no asking again before)
        self._poll_weights(store)
        # the next group is asked for ahead, while decoding goes on: (reply, version asked with);
        # Ray runs one caller's calls to an actor in order and each blocking one costs a
        # process switch, so nothing on the decode loop's path waits for an answer it could
        # have asked for earlier
        asked: tuple[Any, tuple[int, int]] | None = None
        while True:
            if self.arrived.done():  # newer weights, taken between decode steps
                self._take_weights(store, waiting=False)
            while not done and dec.free_slots() >= n and self.weights >= wait_for:
                t = time.perf_counter()
                if asked is None:
                    asked = (self._ask(dispatcher), self.weights)
                r = ray.get(asked[0])
                if "wait" in r and asked[1] < self.weights:  # an answer for older weights: ask again
                    r = ray.get(self._ask(dispatcher))
                asked = None
                self.split["dispatch_s"] += time.perf_counter() - t
                if r.get("done"):
                    done = True
                elif "wait" in r:
                    if dec.active():
                        wait_for = tuple(r["wait"])
                        break  # keep decoding; ask again once the weights are new enough
                    while self.weights < tuple(r["wait"]):  # nothing to do until then
                        self._take_weights(store, waiting=True)
                else:
                    g, p = r["group"], r["prompt"]
                    tag = (g, r["generation"])
                    # its queue slots and the next group are asked for now; both answers
                    # come while it decodes
                    groups[tag] = {"step": r["step"], "prompt": p, "version": self.version, "done": [],
                                   "ids": tq.allocate(n, r["partition"], n, wait=False)}
                    asked = (self._ask(dispatcher), self.weights)
                    for j in range(n):
                        dec.add(Request(list(p.tokens), self.max_response, tag=tag, seed=sample_seed(self.seed, g, j)))
            if not dec.active():
                if done:
                    break
                if self.weights < wait_for:  # nothing to decode until newer weights come: wait for them
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
        lat = sorted(self.weights_latency_s)
        return {"worker": self.worker, "engine": type(self.engine).__name__, "samples": self.samples,
                "weights_loaded": len(lat), "weights_latency_median_s": lat[len(lat) // 2] if lat else None,
                **self.timer.report(),
                **{k: round(v, 4) for k, v in self.split.items()}}

    def _ask(self, dispatcher):
        """Ask the dispatcher for a group, telling it which writes have landed since."""
        landed, late, self.landed, self.late = self.landed, self.late, [], []
        return dispatcher.next.remote(self.key, self.weights, landed, late)

    def _write(self, tq: TransferQueue, tag: tuple[int, int], grp: dict[str, Any]) -> None:
        n = self.rl.group_size
        group = tag[0]
        ids = self.timer.wait(ray.get, grp["ids"])
        if not ids:  # its step is trained already (a duplicate of a group handed out again), or its generation lost
            log(f"rollout worker {self.worker}: group {group} of step {grp['step']} (learner generation {tag[1]}) "
                f"came too late; dropped")
            self.late.append(tag)
            return
        cs = grp["done"]
        # the write travels while decoding goes on; it is reported written only once it has
        # landed (_check_landed), so a worker killed mid-write leaves its group to be handed
        # out again
        now = time.time()
        samples = [Sample(grp["prompt"], c.response, list(c.logprobs), grp["version"], group, now) for c in cs]
        landed = tq.put(ids, to_columns(samples, ROLLOUT_FIELDS), wait=False)
        self.landing.append((landed, tag))
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
