"""`pliant train`: launcher commands for clusters, and clear errors for mismatched launches."""
from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def _cfg(tmp_path, text: str):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


BASE = (REPO / "configs" / "flexsp-7b-64gpu.yaml").read_text()


def run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "pliant.launch.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_print_torchrun_commands_per_node(tmp_path):
    cfg = _cfg(tmp_path, BASE.replace("  backend: nccl", "  backend: nccl\n  hosts: [h0, h1, h2, h3, h4, h5, h6, h7]\n"
                                                          "  port: 29611"))
    r = run("train", "--config", str(cfg), "--steps", "3", "--print-commands")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if not ln.startswith("#")]
    assert len(lines) == 8
    for node, line in enumerate(lines):
        assert "pliant.launch.elastic" in line and "--nproc-per-node=8" in line and "--nnodes=8" in line
        assert "--rdzv-backend=c10d" in line and "--rdzv-endpoint=h0:29611" in line
        assert f"--local-addr=h{node}" in line and f"is_host={int(node == 0)}" in line
        assert "--start-method=forkserver --run-path" in line and "launch/worker.py" in line and "--steps 3" in line


def test_multi_node_without_hosts_is_an_error(tmp_path):
    r = run("train", "--config", str(_cfg(tmp_path, BASE)), "--print-commands")
    assert r.returncode == 2 and "cluster.hosts" in r.stderr and "8-node" in r.stderr


def test_bench_and_profile_run_one_node_of_a_multi_node_config(tmp_path):
    """`pliant bench train` and `pliant profile` on a multi-node config run this node's part
    (--node-rank, as `pliant train`); without one they name what is missing instead of
    printing commands; --print-commands still prints every node's."""
    cfg = _cfg(tmp_path, BASE.replace("  backend: nccl", "  backend: nccl\n  hosts: [h0, h1, h2, h3, h4, h5, h6, h7]"))
    for cmd in (["bench", "train"], ["profile"]):
        r = run(*cmd, "--config", str(cfg))
        assert r.returncode == 2 and "--node-rank" in r.stderr and "8-node" in r.stderr, (cmd, r.stderr)
        r = run(*cmd, "--config", str(cfg), "--node-rank", "9")
        assert r.returncode == 2 and "node rank 9" in r.stderr, (cmd, r.stderr)
    r = run("bench", "train", "--config", str(cfg), "--print-commands", "--batchada")
    assert r.returncode == 0 and r.stdout.count("train_bench.py") == 8 and "--batchada" in r.stdout


def test_hosts_must_match_nodes(tmp_path):
    cfg = _cfg(tmp_path, BASE.replace("  backend: nccl", "  backend: nccl\n  hosts: [h0, h1]"))
    r = run("train", "--config", str(cfg), "--print-commands")
    assert r.returncode == 2 and "hosts lists 2 addresses for nodes=8" in r.stderr


def test_world_size_mismatch_is_named(tmp_path):
    """A 4-device config launched on 2 processes fails on every rank with both numbers."""
    cfg = REPO / "tests" / "configs" / "equiv-4cpu.yaml"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                        "pliant.launch.worker", "--config", str(cfg), "--steps", "1"], capture_output=True, text=True,
                       timeout=300, env={**__import__("os").environ, "DS_ACCELERATOR": "cpu"})
    assert r.returncode != 0
    assert "the config's cluster has 4 devices (1 nodes x 4), but 2 processes were launched" in r.stderr


@__import__("pytest").mark.slow
def test_pliant_train_runs_the_local_default(tmp_path):
    """The README's main job, shortened: 3 steps of configs/local-cpu.yaml through torchrun."""
    r = run("train", "--config", str(REPO / "configs" / "local-cpu.yaml"), "--steps", "3", "--run-dir",
            str(tmp_path / "run"), timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    import json

    first = json.loads(lines[0])
    assert first["step"] == 1 and 4.5 < first["loss"] < 6.5  # about ln(256) at the start
    assert first["memory_bytes"] > 10_000_000 and first["predicted_memory_bytes"] > 0
    assert "step 3/3" in r.stdout


def test_a_restart_launcher_waits_for_the_previous_start_and_counts_a_zombie_as_gone():
    """launch/elastic.py's wait: returns once every process it was given has exited (an
    unreaped zombie counts), and not before; the supervisor's stop counts zombies alike."""
    import threading
    import time

    import psutil

    from pliant.launch.elastic import processes, running, wait_for_exit

    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    while psutil.Process(zombie.pid).status() != psutil.STATUS_ZOMBIE:  # exited, not reaped
        time.sleep(0.01)
    assert not running(psutil.Process(zombie.pid))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (wait_for_exit(processes([zombie.pid, sleeper.pid, 2 ** 22 + 7]),
                                                            timeout_s=30), done.set()))
    waiter.start()
    assert not done.wait(1.0)  # the sleeper still runs
    sleeper.kill()
    assert done.wait(5.0)
    waiter.join()
    sleeper.wait()
    zombie.wait()
