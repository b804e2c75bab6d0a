"""RL runs on a local Ray cluster (2 CPUs), small: the staleness bound holds on every trained
sample, every group is trained exactly once, importance weights are exactly 1 when k = 0, a
rollout worker killed mid-run is restarted with no sample lost or trained twice, and bad
input (a reward function that raises, resources the cluster lacks) gives logged skips or a
clear error. The staleness, exactly-once, killed-worker and reward-error runs use a learner
of two ranks (W = 2: one process group, DeepSpeed, the planner placing each micro-batch)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import torch

from pliant.config import RLJobConfig, load_config, merge_config, parse_config
from pliant.rl import runner
from pliant.rl.resume import warm_start_key
from pliant.runtime.faults import FAULT_ENV

pytestmark = pytest.mark.timeout(300)
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "rl-local.yaml"
SMALL = {"rl": {"steps": 4, "prompts_per_step": 4, "group_size": 4, "micro_batch_groups": 1, "rollout_slots": 8,
                "sft_steps": 10, "eval_prompts": 16}, "task": {"max_digits": 12}}
W2 = {"resources": {"learner": {"world": 2, "num_cpus": 0.5}}}  # with rollout's 1 CPU: the cluster's 2


def config(**overlay) -> RLJobConfig:
    base = load_config([CONFIG], RLJobConfig).model_dump()
    return parse_config(merge_config(merge_config(base, SMALL), overlay), "test", RLJobConfig)


def config_w2(**overlay) -> RLJobConfig:
    return config(**merge_config(W2, overlay))


@pytest.fixture(scope="module")
def ray_cluster():
    # the workers import this module's reward function
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parent)}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def sft(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sft") / "sft.pt"


def every_group_trained_once(r: runner.RunResult, cfg: RLJobConfig) -> None:
    groups = cfg.rl.steps * cfg.rl.prompts_per_step
    assert sorted(r.learner["trained_groups"]) == list(range(groups))
    assert r.learner["world"] == cfg.resources.learner.world
    assert r.samples == groups * cfg.rl.group_size
    per_step = [s["samples"] for s in r.steps]
    assert per_step == [cfg.rl.samples_per_step] * cfg.rl.steps


@pytest.mark.parametrize("k", [1, 2])
def test_staleness_never_exceeds_k(ray_cluster, sft, tmp_path, k):
    cfg = config_w2()
    r = runner.run(cfg, tmp_path, mode="async", staleness=k, sft_cache=sft)
    every_group_trained_once(r, cfg)
    staleness = [x for s in r.steps for x in s["staleness"]]
    assert len(staleness) == r.samples and max(staleness) <= k and min(staleness) >= 0
    assert sum(r.group_sizes().values()) >= cfg.rl.steps  # the planner placed every micro-batch


class CountingEngine:
    """A rollout engine attached through rl.rollout_engine (as a vLLM adapter would be): here
    it wraps the built-in one and counts the calls of the interface."""

    def __init__(self, inner):
        self.inner, self.calls = inner, {"add": 0, "step": 0, "load_weights": 0}

    def add(self, request):
        self.calls["add"] += 1
        self.inner.add(request)

    def free_slots(self):
        return self.inner.free_slots()

    def active(self):
        return self.inner.active()

    def step(self):
        self.calls["step"] += 1
        return self.inner.step()

    def load_weights(self, packed, version):
        self.calls["load_weights"] += 1
        self.inner.load_weights(packed, version)


def counting_engine(model_spec, rl, task, seed, worker):
    from pliant.rl.rollout_engine import BuiltinEngine

    return CountingEngine(BuiltinEngine(model_spec, rl, task, seed, worker))


def test_k0_trains_on_policy_with_importance_weights_of_one(ray_cluster, sft, tmp_path):
    """Also: the rollout runs through an engine attached by rl.rollout_engine."""
    cfg = config(rl={"rollout_engine": "test_rl_run:counting_engine"})
    r = runner.run(cfg, tmp_path, mode="async", staleness=0, sft_cache=sft)
    every_group_trained_once(r, cfg)
    assert all(s["max_staleness"] == 0 for s in r.steps)
    assert all(s["is_weight_min"] == 1.0 and s["is_weight_max"] == 1.0 for s in r.steps)
    assert [w["engine"] for w in r.rollout] == ["CountingEngine"]
    with pytest.raises(runner.RLConfigError, match=r"rl.rollout_engine='test_rl_run:no_such_factory'.*has no "
                                                    r"attribute 'no_such_factory'"):
        runner.run(config(rl={"rollout_engine": "test_rl_run:no_such_factory"}), tmp_path / "bad")


def test_sync_mode_is_on_policy(ray_cluster, sft, tmp_path):
    cfg = config()
    r = runner.run(cfg, tmp_path, mode="sync", sft_cache=sft)
    every_group_trained_once(r, cfg)
    assert all(s["max_staleness"] == 0 and s["is_weight_max"] == 1.0 for s in r.steps)
    assert set(r.eval_reward) == {"before", "after"} and all(0.0 <= v <= 1.0 for v in r.eval_reward.values())


def test_a_killed_rollout_worker_is_restarted_and_nothing_is_lost_or_trained_twice(ray_cluster, sft, tmp_path,
                                                                                    monkeypatch):
    # enough steps after the kill that the worker is still mid-run when the driver (polling
    # every 0.5 s) gets to it: at k=1 it is at most one step ahead of the learner
    cfg = config_w2(rl={"steps": 12})
    monkeypatch.setenv(FAULT_ENV, json.dumps({"kind": "kill_rollout", "rank": 0, "step": 2}))
    r = runner.run(cfg, tmp_path, mode="async", staleness=1, sft_cache=sft)
    assert r.restarts == 1
    fired = json.loads((tmp_path / "faults" / "fired-a0-r0-kill_rollout.json").read_text())
    assert fired["kind"] == "kill_rollout" and fired["rank"] == 0 and fired["step"] >= 2
    every_group_trained_once(r, cfg)
    assert all(n >= 1 for n in r.dispatcher["written"].values())
    # a group handed out again whose first write had landed and been trained is dropped, not lost
    assert all(g in r.learner["trained_groups"] for g in r.dispatcher["late"])
    assert not r.dispatcher["held"] or all(not v for v in r.dispatcher["held"].values())


def test_rollout_faults_fire_once_in_the_first_incarnation_only(tmp_path, monkeypatch):
    """The kill_rollout hook without Ray: nothing before its step, one kill of the named
    worker (and a fired record) at or after it, none of the restarted worker; no faults: a no-op."""
    from pliant.runtime.faults import RolloutFaults, faults_from_env

    killed = []
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart=False: killed.append((actor, no_restart)))
    monkeypatch.setenv(FAULT_ENV, json.dumps([{"kind": "kill_rollout", "rank": 1, "step": 3},
                                              {"kind": "crash", "rank": 0, "step": 1}]))
    assert [f.kind for f in faults_from_env()] == ["kill_rollout", "crash"]
    hook = RolloutFaults.from_env(tmp_path, log=lambda msg: None)
    workers = {0: "w0", 1: "w1"}
    hook.on_step(2, workers, {0: 0, 1: 0})
    assert killed == []
    hook.on_step(4, workers, {0: 0, 1: 0})
    assert killed == [("w1", True)]
    fired = json.loads((tmp_path / "faults" / "fired-a0-r1-kill_rollout.json").read_text())
    assert fired["step"] == 4 and fired["attempt"] == 0
    hook.on_step(5, {0: "w0", 1: "w1-again"}, {0: 0, 1: 1})
    assert killed == [("w1", True)]
    # a worker restarted before the fault's step is not its first start: it runs clean
    late = RolloutFaults(faults_from_env(), None, log=lambda msg: None)
    late.on_step(9, workers, {1: 1})
    assert killed == [("w1", True)]
    monkeypatch.delenv(FAULT_ENV)
    none = RolloutFaults.from_env(tmp_path)
    assert not none
    none.on_step(100, workers, {})
    assert killed == [("w1", True)]


def flaky_reward(sample):
    if sample.response_ids[:1] == [int(sample.row["digits"][0])]:  # right first digit: the verifier fails
        raise RuntimeError(f"verifier unavailable for {sample.prompt}")
    return 1.0 if sample.response == sample.row["digits"] else 0.0


def test_a_reward_function_that_raises_is_logged_and_its_samples_skipped(ray_cluster, sft, tmp_path):
    cfg = config_w2(rl={"reward_fn": "test_rl_run:flaky_reward"})
    r = runner.run(cfg, tmp_path, mode="async", staleness=1, sft_cache=sft)
    skipped = r.reward_worker["skipped"]
    assert skipped and all("verifier unavailable" in s["error"] for s in skipped)
    assert sorted(r.learner["trained_groups"]) == list(range(cfg.rl.steps * cfg.rl.prompts_per_step))
    # a skipped sample is not trained, and a group left with fewer than two is skipped whole
    dropped = [s for s in r.learner["skipped"] if s["why"] == "no reward"]
    assert len(dropped) >= len(skipped)
    assert r.samples == cfg.rl.steps * cfg.rl.samples_per_step - len(dropped)


def test_more_resources_than_the_cluster_has_is_a_clear_error(ray_cluster, sft, tmp_path):
    cfg = config(resources={"rollout_workers": 3})
    with pytest.raises(runner.RLResourceError, match=r"ask for 4 CPU .* the Ray cluster has 2"):
        runner.run(cfg, tmp_path, sft_cache=sft)


def test_samples_with_empty_responses_are_logged_and_skipped_without_a_stall(ray_cluster, tmp_path):
    """Two groups of step 0 written straight into the queue: one with an empty response
    (trained on its other three samples), one with three (too few left for an advantage:
    skipped whole); the step still completes."""

    from pliant.rl.weights import WeightStore
    from pliant.rl.task import build_task
    from pliant.rl.transfer_queue import TransferQueue

    cfg = config(rl={"steps": 1, "prompts_per_step": 2, "micro_batch_groups": 2, "sft_steps": 0})
    task = build_task(cfg.task, cfg.model, 0, 0)
    tq = TransferQueue.create(64, runner.TASKS, units=2)
    store = WeightStore.remote()
    learners, pg = runner.start_learners(cfg, task, 0)
    state, _ = ray.get(learners[0].warm_start.remote(None))
    ray.get(learners[0].build.remote(state))
    prompts = task.prompts(2)
    for g, empty in ((0, {1}), (1, {0, 2, 3})):
        p = prompts[g]
        ids = tq.allocate(4, partition=0, group_size=4)
        responses = [[] if j in empty else (list(p.answer) if j % 2 else [3, 12]) for j in range(4)]
        logp = [[-1.0] * len(r) for r in responses]
        tq.put(ids, {"prompt": [p] * 4, "response": responses, "behav_logp": logp, "version": [0] * 4,
                     "group": [g] * 4, "written_at": [0.0] * 4,
                     "reward": [float(r == list(p.answer)) for r in responses],
                     "ref_logp": [None if not r else lp for r, lp in zip(responses, logp)]})
    out = ray.get(learners[0].run.remote(tq, store, False), timeout=60)
    (step,) = out["steps"]
    assert step["samples"] == 3
    assert sorted(s["group"] for s in out["skipped"]) == [0, 1, 1, 1]
    assert {s["why"] for s in out["skipped"]} == {"empty response"}
    assert sorted(out["trained_groups"]) == [0, 1]
    for a in (*learners, store, tq.controller, *tq.units):
        ray.kill(a)
    ray.util.remove_placement_group(pg)


def test_a_queue_too_small_for_the_staleness_bound_is_a_clear_error(ray_cluster, sft, tmp_path):
    cfg = config(rl={"queue_capacity": 32})
    with pytest.raises(runner.RLConfigError, match=r"rl.queue_capacity=32 cannot hold the 3 steps .* at least 48"):
        runner.run(cfg, tmp_path, mode="async", staleness=2, sft_cache=sft)


CALLS = [0]


def dying_reward(sample):
    import os

    CALLS[0] += 1
    if CALLS[0] == 20:
        os._exit(3)  # the reward worker's process dies mid-run
    return 0.0


def test_a_dead_reward_worker_stops_the_run_with_its_error(ray_cluster, sft, tmp_path):
    cfg = config(rl={"reward_fn": "test_rl_run:dying_reward"})
    with pytest.raises(RuntimeError, match="the reward worker failed"):
        runner.run(cfg, tmp_path, mode="async", staleness=1, sft_cache=sft)


def test_a_cached_warm_start_is_reused_only_with_the_settings_that_made_it(ray_cluster, tmp_path):
    from pliant.rl.task import build_task

    cfg, cache = config(), tmp_path / "warm.pt"
    learners, pg = runner.start_learners(cfg, build_task(cfg.task, cfg.model, 1, 0), 0)
    lead = learners[0]
    key = warm_start_key(cfg, 0)
    made, losses = runner.warm_start(lead, cache, key)
    assert len(losses) == cfg.rl.sft_steps  # made, then cached
    again, losses = runner.warm_start(lead, cache, key)
    assert losses == [] and all(torch.equal(made[k], again[k]) for k in made)  # the same settings: reused
    other = warm_start_key(config(rl={"sft_lr": 1e-3}), 0)
    assert len(runner.warm_start(lead, cache, other)[1]) == cfg.rl.sft_steps  # other settings: made again
    assert len(runner.warm_start(lead, cache, warm_start_key(cfg, 1))[1]) == cfg.rl.sft_steps  # other seed
    ray.kill(lead)
    ray.util.remove_placement_group(pg)


# ----- the dataset path: a Hugging Face policy, prompts from a file, a reward function from a file -----

@pytest.fixture(scope="module")
def arithmetic(tmp_path_factory) -> Path:
    from pliant.rl.arithmetic import prepare_arithmetic

    out = tmp_path_factory.mktemp("arith")
    prepare_arithmetic(out, train=200, test=40, hidden=32, layers=1, ffn_hidden=64)
    return out


def dataset_config(arith: Path, **overlay) -> RLJobConfig:
    reward = Path(__file__).resolve().parents[1] / "examples" / "arithmetic_reward.py"
    job = {"model": {"name": "arith", "hf_path": str(arith / "policy"), "attention": ["softmax"], "zero_stage": 0,
                     "dtype": "fp32"},
           "task": {"kind": "dataset", "dataset": str(arith / "train.jsonl"), "eval_dataset": str(arith / "test.jsonl"),
                    "prompt_key": "question", "answer_key": "answer", "chat_template": True,
                    "max_response_tokens": 6},
           "rl": {"steps": 2, "prompts_per_step": 4, "group_size": 4, "micro_batch_groups": 2, "rollout_slots": 8,
                  "sft_steps": 5, "eval_prompts": 8, "reward_fn": f"{reward}:reward"}}
    base = load_config([CONFIG], RLJobConfig).model_dump()
    data = merge_config(merge_config(base, {k: v for k, v in job.items() if k != "model"}), overlay)
    data["model"] = merge_config(job["model"], overlay.get("model", {}))
    data["task"] = merge_config(job["task"], overlay.get("task", {}))
    return parse_config(data, "test", RLJobConfig)


def test_bad_input_is_a_clear_error_before_any_worker_starts(ray_cluster, arithmetic, tmp_path):
    from pliant.rl.prompts import PromptDataError
    from pliant.rl.reward import RewardFnError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "What is 1 + 1?", "answer": "2"}\n{"prompt": "What is 2 + 2?", "answer": "4"}\n')
    with pytest.raises(PromptDataError, match=rf"{bad}: row 2: no key 'question' .*the row's keys: 'prompt', 'answer'"):
        runner.run(dataset_config(arithmetic, task={"dataset": str(bad)}), tmp_path / "a")
    broken = tmp_path / "broken_reward.py"
    broken.write_text("import not_a_module_anywhere\n\ndef reward(sample):\n    return 0.0\n")
    with pytest.raises(RewardFnError, match=rf"rl.reward_fn=.*{broken.name}.*ModuleNotFoundError.*not_a_module"):
        runner.run(dataset_config(arithmetic, rl={"reward_fn": f"{broken}:reward"}), tmp_path / "b")
    with pytest.raises(RewardFnError, match=r"cannot import module no_such_rewards: ModuleNotFoundError"):
        runner.run(dataset_config(arithmetic, rl={"reward_fn": "no_such_rewards:score"}), tmp_path / "c")
    with pytest.raises(PromptDataError, match=r"train.jsonl: row 1: the prompt is \d+ tokens.* above the policy.s context of 12 tokens"):
        runner.run(dataset_config(arithmetic, task={"max_context_tokens": 12, "overlong": "error"}), tmp_path / "d")
    assert not (tmp_path / "a").exists()  # nothing started, nothing written


@pytest.mark.parametrize("learner, message", [
    ({"world": 3, "num_cpus": 1}, r"ask for 4 CPU \(rollout 1 x 1, learner 3 x 1.*the Ray cluster has 2"),
    ({"world": 1, "num_gpus": 1}, r"ask for 1 GPU .*learner 1 x 1.* the Ray cluster has 0")])
def test_a_learner_larger_than_the_cluster_is_a_clear_error(ray_cluster, sft, tmp_path, learner, message):
    cfg = config(resources={"learner": learner})
    with pytest.raises(runner.RLResourceError, match=message):
        runner.run(cfg, tmp_path, sft_cache=sft)
