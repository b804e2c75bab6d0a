"""The distributed learner (rl/learner.py) against the single-process learner step.

Two Ray actors form the learner's process group (gloo) and take one GRPO step with
DeepSpeed ZeRO-1 on the same samples as a plain single-process step: the policy loss of
every sample as the mean of its response tokens' terms (rl/grpo.py `policy_loss` on the
packed forward of each micro-batch), AdamW with float32 master weights and the same
clipping. The model, its forward and backward, the log-probs and the loss run in float64;
DeepSpeed's ZeRO optimizer keeps float32 master weights and reduces gradients in float32,
so the optimizer path is the part that cannot run in float64 and the parameters are
compared at the float32 bound (1e-5 relative L2), as the pre-training equivalence tests do.

The samples are chosen so that the planner, under the config's tight device memory, puts
the short ones of one micro-batch into two groups of one rank each and the long one of the
other into one group of two (SP: each rank holds half of every sequence).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import ray
import torch

from pliant.config import RLJobConfig, load_config, merge_config, parse_config
from pliant.rl import runner
from pliant.rl.grpo import pack_loss, policy_loss, policy_sequences, response_logprobs
from pliant.rl.learner import Chunk
from pliant.rl.sample import Sample
from pliant.rl.task_protocol import Prompt
from pliant.rl.task import build_task
from pliant.comm import SPGroup
from pliant.runtime.hf import build_model

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[1]
RTOL = 1e-5
EQUIV = {
    "model": {"name": "tiny-hybrid", "layers": 2, "hidden": 32, "heads": 4, "kv_heads": 2, "head_dim": 8,
              "ffn_hidden": 64, "vocab_size": 16, "attention": ["linear", "softmax"], "zero_stage": 1,
              "dtype": "fp64"},
    "rl": {"steps": 1, "prompts_per_step": 3, "group_size": 2, "micro_batch_groups": 2, "lr": 3e-3,
           "weight_decay": 0.01, "grad_clip": 0.5, "kl_coef": 0.05, "temperature": 0.9, "sft_steps": 0,
           "eval_prompts": 0},
    "resources": {"num_cpus": 2, "learner": {"world": 2, "num_cpus": 1, "threads": 1}},
    # tight memory: the planner must split a sample of ~100 tokens over both ranks
    "learner": {"plan": "adaptive", "device_memory_gib": 0.0009,
                "bandwidth": {"all_to_all_gbps": None, "all_gather_gbps": None, "intra_node_gbps": 1.0,
                              "inter_node_gbps": 1.0},
                "cost": {"a1_ms": 1.0e-3, "a2_ms": 0.02, "beta_ms": 1.0, "activation_bytes_per_token": 1.0e4},
                "planner": {"solver": "heuristic"}},
}


def config(**overlay) -> RLJobConfig:
    base = load_config([REPO / "configs" / "rl-local.yaml"], RLJobConfig).model_dump()
    return parse_config(merge_config(merge_config(base, EQUIV), overlay), "test", RLJobConfig)


def make_sample(g: torch.Generator, p: int, r: int, version: int, adv: float) -> Sample:
    """A sample of a p-token prompt and an r-token response, random ids and log-probs."""
    prompt = torch.randint(0, 16, (p,), generator=g).tolist()
    response = torch.randint(0, 16, (r,), generator=g).tolist()
    behav = (-2.5 + 0.3 * torch.randn(r, generator=g, dtype=torch.float64)).tolist()
    ref = (-2.5 + 0.3 * torch.randn(r, generator=g, dtype=torch.float64)).tolist()
    return Sample(Prompt(0, tuple(prompt)), response, behav_logp=behav, version=version, ref_logp=ref, adv=adv)


def samples(seed: int) -> list[list[Sample]]:
    """Two micro-batches of GRPO groups (2 samples each): short samples, then a long one."""
    g = torch.Generator().manual_seed(seed)
    short = [make_sample(g, 5, 7, 0, 1.0), make_sample(g, 4, 9, 0, -1.0), make_sample(g, 6, 3, -1, 0.7),
             make_sample(g, 3, 11, -1, -0.7)]
    long = [make_sample(g, 12, 78, 0, 0.9), make_sample(g, 7, 14, 0, -0.9)]
    return [short, long]


def reference_step(cfg: RLJobConfig, state: dict, chunks: list[list[Sample]]) -> torch.Tensor:
    """The single-process learner step: plain torch, no SP, no DeepSpeed; float32 master weights."""
    rl = cfg.rl
    model = build_model(cfg.model, "cpu", torch.float64)
    model.load_state_dict(state)
    master = [p.detach().float().clone().requires_grad_(True) for p in model.parameters()]
    opt = torch.optim.AdamW(master, lr=rl.lr, weight_decay=rl.weight_decay)
    model.zero_grad()
    for chunk in chunks:
        lps = response_logprobs(model, [list(s.prompt.tokens) for s in chunk], [s.response for s in chunk],
                                rl.temperature)
        f64 = torch.float64
        loss, _ = policy_loss([lp.to(f64) for lp in lps], [torch.tensor(s.behav_logp, dtype=f64) for s in chunk],
                              [torch.tensor(s.ref_logp, dtype=f64) for s in chunk],
                              torch.tensor([s.adv for s in chunk], dtype=f64), [s.version for s in chunk], 0,
                              rl.samples_per_step, rl.clip_eps, rl.kl_coef, rl.is_cap)
        loss.backward()
    for m, p in zip(master, model.parameters()):
        m.grad = p.grad.float()
    torch.nn.utils.clip_grad_norm_(master, rl.grad_clip)
    opt.step()
    return torch.cat([m.detach().reshape(-1).double() for m in master])


def test_pack_loss_of_one_rank_is_the_single_process_policy_loss():
    """pack_loss on a group of one (the whole pack) equals policy_loss on the same samples:
    loss and gradients, float64."""
    cfg = config()
    torch.manual_seed(0)
    model = build_model(cfg.model, "cpu", torch.float64)
    chunk = samples(1)[0]
    rl = cfg.rl
    pack = policy_sequences(chunk, 0, rl.samples_per_step).shard(SPGroup(0, 1, 0, None))
    loss, stats = pack_loss(model(pack.tokens, pack.ctx), pack, len(chunk), rl.clip_eps, rl.kl_coef, rl.is_cap,
                            rl.temperature)
    got = torch.autograd.grad(loss, list(model.parameters()))
    f64 = torch.float64
    lps = response_logprobs(model, [list(s.prompt.tokens) for s in chunk], [s.response for s in chunk],
                            rl.temperature)
    want, st = policy_loss(lps, [torch.tensor(s.behav_logp, dtype=f64) for s in chunk],
                           [torch.tensor(s.ref_logp, dtype=f64) for s in chunk], torch.tensor([s.adv for s in chunk], dtype=f64),
                           [s.version for s in chunk], 0, rl.samples_per_step, rl.clip_eps, rl.kl_coef, rl.is_cap)
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-12)
    for g, e in zip(got, torch.autograd.grad(want, list(model.parameters()))):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-13)
    weights = (stats[:, 0] / stats[:, 3]).tolist()
    assert weights == pytest.approx(st.is_weights, rel=1e-12)
    assert weights[0] == 1.0 and weights[2] != 1.0  # version 0 is current; version -1 is stale


def test_a_learner_of_two_ranks_takes_the_single_process_step(ray_cluster):
    def check(plans):
        mixes = [dict(p.group_mix()) for p in plans]
        assert mixes[0] == {1: 2}, mixes  # two groups of one rank
        assert mixes[1].get(2, 0) >= 1, mixes  # the long sample: one group of both ranks

    distributed_step(config(), samples(1), check)


def mixed(seed: int) -> list[Sample]:
    """One micro-batch: a long sample that needs a group of two, and short ones."""
    g = torch.Generator().manual_seed(seed)
    return [make_sample(g, 12, 78, 0, 0.9), make_sample(g, 7, 14, 0, -0.9), make_sample(g, 5, 17, -1, 0.6),
            make_sample(g, 6, 15, 0, -0.6)]


def distributed_step(cfg: RLJobConfig, chunks: list[list[Sample]], check_plans) -> None:
    """One step of the learner group on `chunks` (each a micro-batch, planned by rank 0 and
    checked by `check_plans`), against the single-process step: every rank's parameters at
    the float32 bound, and the step large enough that the check means something."""
    task = build_task(cfg.task, cfg.model, 0, 0)
    torch.manual_seed(0)
    initial = build_model(cfg.model, "cpu", torch.float64)
    state = initial.state_dict()
    start = torch.cat([p.detach().reshape(-1) for p in initial.parameters()])
    learners, pg = runner.start_learners(cfg, task, seed=0)
    try:
        ray.get([a.build.remote(state) for a in learners])
        plans = ray.get([learners[0].plan.remote(c) for c in chunks])
        check_plans(plans)
        for k, (c, plan) in enumerate(zip(chunks, plans)):
            ray.get([a.train_chunk.remote(Chunk(c, plan, k == len(chunks) - 1), 0) for a in learners])
        ray.get([a.optimizer_step.remote() for a in learners])
        got = ray.get([a.parameters_vector.remote() for a in learners])
    finally:
        for a in learners:
            ray.kill(a)
        ray.util.remove_placement_group(pg)
    want = reference_step(cfg, state, chunks)
    moved = ((want - start).norm() / start.norm()).item()
    assert moved > 100 * RTOL, f"the step barely moved the parameters ({moved:.1e}): the check would be vacuous"
    for rank, params in enumerate(got):
        rel = ((params - want).norm() / want.norm()).item()
        print(f"rank {rank}: parameters vs the single-process step: relative L2 {rel:.1e} (step size {moved:.1e})")
        assert rel <= RTOL, f"rank {rank}: relative L2 error {rel:.3e}"
    assert all(torch.equal(got[0], g) for g in got[1:])


def test_a_learner_of_four_ranks_with_groups_of_2_1_1_takes_the_single_process_step(ray_cluster):
    """Four ranks, one micro-batch planned into a group of two (the long sample, split over
    both its ranks) and two groups of one (the short samples): the parameters after the step
    equal the single-process step's at the float32 bound, on every rank."""
    def check(plans):
        (plan,) = plans
        assert dict(plan.group_mix()) == {2: 1, 1: 2} and len(plan.micro_batches) == 1, plan.group_mix()
        long_group = next(g for g in plan.micro_batches[0].groups if g.size == 2)
        assert long_group.seq_ids == [0], long_group.seq_ids  # the long sample is the one split

    distributed_step(config(resources={"learner": {"world": 4, "num_cpus": 0.5}}, rl={"prompts_per_step": 2}),
                     [mixed(2)], check)


def test_the_learner_group_as_the_planner_sees_it():
    """resources.learner.world ranks; a bandwidth table measured for a larger machine keeps the
    sizes this world forms; settings the learner cannot run are clear errors."""
    from pliant.config import ConfigError
    from pliant.rl.learner import learner_cluster
    from pliant.rl.spec import RLConfigError

    c = learner_cluster(config(learner={"bandwidth": {"intra_node_gbps": None, "inter_node_gbps": None,
                                                      "all_to_all_gbps": {2: 1.0, 4: 2.0}}}))
    assert (c.world_size, c.device, c.backend, sorted(c.bandwidth.all_to_all_gbps)) == (2, "cpu", "gloo", [2])
    one = learner_cluster(config(resources={"learner": {"world": 1}}))
    assert one.world_size == 1
    with pytest.raises(RLConfigError, match=r"zero_stage=3: the RL learner runs ZeRO stages 0-2"):
        learner_cluster(config(model={"zero_stage": 3}))
    with pytest.raises(RLConfigError, match=r"world=3 is not a multiple of learner.devices_per_node=2"):
        learner_cluster(config(resources={"learner": {"world": 3}}, learner={"devices_per_node": 2}))
    with pytest.raises(ConfigError, match=r"static_degree=2 is set but plan is 'adaptive'"):
        config(learner={"static_degree": 2})
    from pliant.rl.learner import learner_capacity

    cap = learner_capacity(config())
    assert cap.ranks == 2 and 90 < cap.tokens < 1_000 and cap.memory_gib == 0.0009  # the long sample (90) fits
    with pytest.raises(RLConfigError, match=r"learner.device_memory_gib=0.0001 holds no sample: the largest SP group "
                                            r"\(2 rank\(s\)\) holds 0 tokens, the policy's model states take"):
        learner_capacity(config(learner={"device_memory_gib": 0.0001}))
    with pytest.raises(ConfigError, match=r"num_gpus=0.5: a learner rank drives one whole GPU"):
        config(resources={"learner": {"num_gpus": 0.5}})
