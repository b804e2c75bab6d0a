"""`pliant rl`, `pliant bench rl` and `pliant report` on RL runs, end to end in subprocesses
(each starts its own local Ray cluster of 2 CPUs)."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from test_cli import pliant

pytestmark = pytest.mark.timeout(600)
SMALL = {"rl": {"steps": 3, "prompts_per_step": 4, "micro_batch_groups": 2, "rollout_slots": 8, "sft_steps": 10,
                "eval_prompts": 16}, "task": {"max_digits": 12}}


@pytest.fixture
def overlay(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    return str(path)


def test_pliant_rl_runs_and_reports(tmp_path, overlay):
    run_dir = tmp_path / "run"
    r = pliant("rl", "--config", "configs/rl-local.yaml", "--config", overlay, "--mode", "async", "--staleness", "2",
               "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stderr
    assert "step    3/3" in r.stderr and "tok/s" in r.stderr and "staleness <=" in r.stderr and "queue" in r.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["mode"] == "async" and summary["staleness"] == 2 and summary["samples"] == 3 * 16
    assert summary["max_staleness"] <= 2 and 0.0 <= summary["eval_reward_after"] <= 1.0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2] and all(row["staleness_bound"] == 2 for row in rows)
    r = pliant("report", str(run_dir))
    assert r.returncode == 0, r.stderr
    assert (run_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pliant_rl_on_a_dataset_with_a_hugging_face_policy(tmp_path):
    """The README's dataset job: `pliant data arithmetic` makes the task and its policy, and
    `pliant rl --config configs/rl-dataset.yaml` (the reward function a file outside the
    package, named relative to the directory pliant runs in) trains a learner of 2 ranks: the
    HF policy generates (HFDecoder), scores (reference) and trains (DeepSpeed, the planner);
    prompts that do not fit the context with their response are skipped and counted."""
    data = tmp_path / "arith"
    r = pliant("data", "arithmetic", "--out", str(data), "--train", "200", "--test", "40")
    assert r.returncode == 0 and (data / "policy" / "config.json").is_file(), r.stderr
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    train = tmp_path / "train.jsonl"  # every 7th prompt made too long for the context below
    train.write_text("".join(json.dumps({**row, "question": row["question"] + " Take your time." * (6 * (i % 7 == 0))})
                             + "\n" for i, row in enumerate(rows)))
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump({
        "model": {"hf_path": str(data / "policy")},
        "task": {"dataset": str(train), "eval_dataset": str(data / "test.jsonl"), "max_context_tokens": 30},
        "rl": {"steps": 2, "prompts_per_step": 4, "group_size": 4, "micro_batch_groups": 2, "rollout_slots": 8,
               "sft_steps": 10, "eval_prompts": 8, "checkpoint_every": 1}}))
    run_dir = tmp_path / "run"
    r = pliant("rl", "--config", "configs/rl-dataset.yaml", "--config", str(small), "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["learner_world"] == 2 and summary["samples"] == 2 * 16
    skipped = summary["task"]["overlong_skipped"]["train"]
    assert skipped == len(range(0, 200, 7)) and summary["task"]["train_prompts"] == 200 - skipped
    assert sum(summary["group_sizes"].values()) >= 2
    assert summary["eval_reward_before"] is not None and 0.0 <= summary["eval_reward_after"] <= 1.0
    assert "learner of 2 rank(s), SP groups" in r.stderr
    # the trained policy out: a checkpoint per step (rl.checkpoint_every 1), complete, that
    # `pliant export` writes as a directory transformers loads with the source's tokenizer
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["step-00000001", "step-00000002"], ckpts
    assert all((run_dir / "checkpoints" / c / "COMPLETE").is_file() for c in ckpts)
    assert f"the trained policy: {(run_dir / 'checkpoints' / 'step-00000002').resolve()}" in r.stderr.replace("\n", "")
    exported = {}
    for step in (1, 2):
        out = tmp_path / f"export-{step}"
        e = pliant("export", "--run-dir", str(run_dir), "--step", str(step), "--out", str(out))
        assert e.returncode == 0, e.stderr[-2000:]
        assert f"exported step {step} of {run_dir} (step-{step:08d}," in e.stdout + e.stderr
        exported[step] = load_exported(out)
    assert exported[2].keys() == exported[1].keys()
    r = pliant("data", "arithmetic", "--out", str(data))
    assert r.returncode == 0 and "exists: keeping it" in r.stdout


@pytest.mark.slow
def test_pliant_rl_on_the_long_context_task_puts_long_samples_into_sp_groups(tmp_path):
    """The README's long-tail job: `pliant data long-context` makes the task and its policy, and
    `pliant rl --config configs/rl-long.yaml` trains a learner of 4 ranks on it: samples that a
    rank's memory does not hold go to groups of 2 or 4, the short ones to groups of one."""
    data = tmp_path / "lc"
    r = pliant("data", "long-context", "--out", str(data), "--train", "400", "--test", "20")
    assert r.returncode == 0 and (data / "policy" / "config.json").is_file(), r.stderr
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    long_rows = [row for row in rows if row["sentences"] >= 160][:6]  # about 1,500 tokens and more
    assert len(long_rows) >= 3
    train = tmp_path / "train.jsonl"  # a long row among every 4 short ones: every step holds some
    train.write_text("".join(json.dumps(row) + "\n" for row in long_rows + [r for r in rows if r["sentences"] < 40][:24]))
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump({
        "model": {"hf_path": str(data / "policy")},
        "task": {"dataset": str(train), "eval_dataset": str(data / "test.jsonl"),
                 "sft_dataset": str(data / "sft.jsonl")},
        "rl": {"steps": 2, "prompts_per_step": 5, "group_size": 4, "micro_batch_groups": 5, "rollout_slots": 8,
               "sft_steps": 10, "eval_prompts": 8}}))
    run_dir = tmp_path / "run"
    r = pliant("rl", "--config", "configs/rl-long.yaml", "--config", str(small), "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    sizes = {int(k) for k in summary["group_sizes"]}
    assert summary["learner_world"] == 4 and 1 in sizes and sizes & {2, 4}, summary["group_sizes"]
    placed = summary["placement"]
    assert placed["1"]["longest"] < min(placed[k]["longest"] for k in placed if k != "1")
    assert summary["learner_step_s"] > 0 and summary["publish_wait_median_s"] is not None
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(row["publish_wait_s"] >= 0 and row["train_s"] > 0 for row in rows)


def load_exported(path: Path) -> dict:
    """An exported directory through transformers: no missing or unexpected keys, the chat
    template with it; its state dict."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert AutoTokenizer.from_pretrained(path).chat_template
    return model.state_dict()


def test_pliant_rl_errors_are_clear(tmp_path, overlay):
    r = pliant("rl", "--config", "configs/rl-local.yaml", "--config", overlay, "--staleness", "-1",
               "--run-dir", str(tmp_path))
    assert r.returncode == 2 and "rl.staleness" in r.stderr and "Traceback" not in r.stderr
    big = tmp_path / "big.yaml"
    big.write_text(yaml.safe_dump({"resources": {"rollout_workers": 4}}))
    r = pliant("rl", "--config", "configs/rl-local.yaml", "--config", overlay, "--config", str(big),
               "--run-dir", str(tmp_path))
    assert r.returncode == 2 and "the Ray cluster has 2" in r.stderr and "Traceback" not in r.stderr


def test_bench_rl_writes_the_summary_and_the_plot(tmp_path, overlay):
    out = tmp_path / "rl.json"
    r = pliant("bench", "rl", "--config", "configs/rl-local.yaml", "--config", overlay, "--seeds", "1",
               "--modes", "sync,async_k1", "--steps", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    body = json.loads(out.read_text())
    s = body["summary"]
    assert s["throughput_ratio_k1"] > 0 and s["samples_ratio_k1"] > 0 and s["seeds"] == 1
    assert s["max_staleness_observed"]["sync"] == 0 and s["max_staleness_observed"]["async_k1"] <= 1
    assert 0.0 <= s["reward_sync"] <= 1.0 and 0.0 <= s["reward_async_k1"] <= 1.0
    assert [run["name"] for run in body["runs"]] == ["sync", "async_k1"]
    for name, key in (("sync", "reward_gain_sync"), ("async_k1", "reward_gain_async_k1")):
        run = next(x for x in body["runs"] if x["name"] == name)
        assert s[key] == pytest.approx(run["eval_reward_after"] - run["eval_reward_before"])
    p, n = s["reward_sync"], body["config"]["rl"]["eval_prompts"]
    assert s["reward_eval_se"] == pytest.approx((p * (1 - p) / n) ** 0.5)
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "async_k1" in r.stdout and "samples/s" in r.stdout
    r = pliant("bench", "rl", "--modes", "async_k1", "--out", str(out))
    assert r.returncode == 2 and "and include sync (unless --learner-plan compares plans)" in r.stderr
    r = pliant("bench", "rl", "--learner-plan", "adaptive,ring", "--out", str(out))
    assert r.returncode == 2 and "--learner-plan 'adaptive,ring' must be distinct plans from adaptive, static" in r.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_pliant_rl_runs_as_a_ray_job_on_an_existing_cluster(tmp_path):
    """The cluster path the README gives: a Ray head started apart (`ray start --head`, here in
    the foreground so that stopping it stops only this cluster), and `ray job submit -- pliant
    rl` with `resources.ray_address: auto`, which joins that cluster instead of starting one."""
    bin_dir = Path(sys.executable).parent
    dash = free_port()
    # its own temp dir (short: Ray's socket paths must fit 107 bytes): the head's address file
    # goes there, not to /tmp/ray, where every later ray.init() on this machine would find it
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # the head and the client share one token
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen([str(bin_dir / "ray"), "start", "--head", "--block", "--num-cpus", "2",
                             "--port", str(free_port()), "--dashboard-port", str(dash), "--include-dashboard", "true",
                             "--disable-usage-stats", "--temp-dir", temp_dir], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([str(bin_dir / "ray"), "job", "list", "--address", address], env=env,
                             capture_output=True, timeout=60).returncode != 0:
            assert head.poll() is None, f"ray start failed: {head.stderr.read()}"
            assert time.monotonic() < deadline, "the Ray head's dashboard did not come up in 120 s"
            time.sleep(1)
        overlay = tmp_path / "job.yaml"
        overlay.write_text(yaml.safe_dump({**SMALL, "resources": {"ray_address": "auto"}}))
        run_dir = tmp_path / "run"
        submit = [str(bin_dir / "ray"), "job", "submit", "--address", address, "--", str(bin_dir / "pliant"), "rl",
                  "--config", str(Path("configs/rl-local.yaml").resolve()), "--config", str(overlay), "--run-dir",
                  str(run_dir)]
        deadline = time.monotonic() + 120
        while True:  # the head's job agent starts after its dashboard: Ray asks to try again until it is up
            r = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=300)
            if "No available agent to submit job" not in r.stdout + r.stderr or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "succeeded" in r.stdout + r.stderr
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["samples"] == 3 * 16 and summary["max_staleness"] <= 1
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_a_run_directory_with_an_earlier_runs_checkpoints_is_refused(tmp_path):
    """Nothing is pruned or mixed: a new run would delete the earlier run's checkpoints (they sort
    first) and export would pick among both. Refused before Ray starts."""
    from pliant.config import RLJobConfig, load_config
    from pliant.rl import runner

    done = tmp_path / "run" / "checkpoints" / "step-00000003"
    done.mkdir(parents=True)
    (done / "COMPLETE").write_text("step 3\n")
    cfg = load_config([Path(__file__).resolve().parents[1] / "configs" / "rl-local.yaml"], RLJobConfig)
    with pytest.raises(runner.RLConfigError, match=r"checkpoints holds an earlier run's checkpoints \(step-00000003 "
                                                   r"the newest\): choose a new --run-dir"):
        runner.run(cfg, tmp_path / "run")
    assert (done / "COMPLETE").is_file()


def test_bench_rl_compares_learner_plans_on_the_same_seeds():
    """by_plan: medians per plan, which samples went to which group size (summed over seeds),
    and adaptive's ratios to every other plan, of the medians and per seed."""
    from pliant.bench.rl_bench import by_plan, print_table

    records = []
    for seed in range(3):
        for plan, step, tok, placed in (
                ("adaptive", 1.0 + 0.1 * seed, 900.0, {"1": (60, 300, 80, 900), "2": (4, 8000, 1900, 2100)}),
                ("static", 2.0 + 0.1 * seed, 450.0, {"4": (64, 8300, 80, 2100)}),
                ("uniform", 1.5 + 0.1 * seed, 600.0, {"1": (56, 280, 80, 700), "2": (8, 8020, 800, 2100)})):
            records.append({"name": "async_k1", "learner_plan": plan, "seed": seed, "learner_step_s": step,
                            "tokens_per_s": tok, "samples_per_s": tok / 100, "rollout_idle_fraction": 0.2,
                            "learner_idle_fraction": 0.3, "eval_reward_before": 0.2, "eval_reward_after": 0.3,
                            "placement": {k: dict(zip(("samples", "tokens", "shortest", "longest"), v))
                                          for k, v in placed.items()}})
    out = by_plan(records, ["adaptive", "static", "uniform"])
    entry = out["modes"]["async_k1"]
    ad, st = entry["plans"]["adaptive"], entry["plans"]["static"]
    assert ad["learner_step_s"] == pytest.approx(1.1) and st["learner_step_s"] == pytest.approx(2.1)
    assert ad["placement"] == {"1": {"samples": 180, "tokens": 900, "shortest": 80, "longest": 900},
                               "2": {"samples": 12, "tokens": 24000, "shortest": 1900, "longest": 2100}}
    r = entry["ratios"]["adaptive_over_static"]
    assert r["learner_step_speedup"] == pytest.approx(2.1 / 1.1) and r["tokens_per_s"] == pytest.approx(2.0)
    assert r["learner_step_speedup_per_seed"] == pytest.approx([2.0, 2.1 / 1.1, 2.2 / 1.2])
    assert entry["ratios"]["adaptive_over_uniform"]["tokens_per_s"] == pytest.approx(1.5)
    print_table({"learner_plans": out})
