"""`pliant train`: start the job through torchrun.

* Launched already (torchrun, deepspeed or a scheduler set RANK and WORLD_SIZE): run this
  rank's worker in-process.
* A single-node config: run torchrun locally with one process per device.
* A multi-node config: each node runs `pliant train --node-rank I` (or takes its rank from
  Slurm); supervised, or with faults off its own torchrun (c10d rendezvous on the first
  host). `--print-commands` prints the torchrun command of every node instead.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from typing import Callable

from pliant.launch.config import ConfigError, load_config
from pliant.launch.nodes import place_node


def config_args(names: list[str]) -> list[str]:
    """`--config A --config B ...`: the config files (base, then overlays) for a rank's command line."""
    return [x for name in names for x in ("--config", str(name))]


def worker_args(args: argparse.Namespace, with_config: bool = True) -> list[str]:
    out = (config_args(args.config) if with_config else []) + ["--run-dir", str(args.run_dir)]
    if args.steps is not None:
        out += ["--steps", str(args.steps)]
    if args.plan is not None:
        out += ["--plan", args.plan]
    if getattr(args, "save_params", False):
        out.append("--save-params")
    if getattr(args, "resume", False) and with_config:
        out.append("--resume")
    return out


def torchrun_command(cfg, node_rank: int, module: str, module_args: list[str],
                     monitor_interval_s: float | None = None, rdzv_id: str = "pliant",
                     local_addr: str | None = None) -> list[str]:
    """torchrun for one node: standalone on one node; on several, c10d rendezvous on the first
    host, which node 0 hosts (`is_host`), each node advertising its own address (`local_addr`,
    else its cluster.hosts entry) so that no node takes a hostname that resolves to loopback."""
    c = cfg.cluster
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={c.devices_per_node}"]
    if monitor_interval_s is not None:
        cmd.append(f"--monitor-interval={monitor_interval_s:g}")
    if c.nodes == 1:
        cmd.append("--standalone")
    else:
        timeout = int(max(1, c.rendezvous_timeout_s))
        cmd += [f"--nnodes={c.nodes}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={c.hosts[0]}:{c.port}", f"--rdzv-id={rdzv_id}",
                f"--rdzv-conf=is_host={int(node_rank == 0)},join_timeout={timeout},read_timeout={min(timeout, 60)}",
                f"--local-addr={local_addr or c.hosts[node_rank]}", "--max-restarts=0"]
    return cmd + ["-m", module, *module_args]


def torchrun_env(cfg) -> dict[str, str]:
    """The environment torchrun and its workers start with: one thread per rank unless set,
    DeepSpeed's CPU accelerator on CPU clusters."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if cfg.cluster.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    return env


def launch(cfg, module: str, module_args: list[str], rank_main: Callable[[list[str]], int],
           print_commands: bool = False) -> int:
    """Run `module` on every rank of the config's cluster: in this process when a launcher
    already started it, through a local torchrun on one node, or print each node's command."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun / deepspeed / a scheduler
        return rank_main(module_args)
    c = cfg.cluster
    if print_commands or c.nodes > 1:
        if c.nodes > 1 and not c.hosts:
            raise ConfigError(f"cluster.hosts: a {c.nodes}-node cluster needs one address per node to build the "
                              f"torchrun commands")
        for node in range(c.nodes):
            host = c.hosts[node] if c.hosts else "localhost"
            print(f"# node {node} ({host})")
            print(" ".join(shlex.quote(x) for x in torchrun_command(cfg, node, module, module_args)))
        return 0
    return subprocess.run(torchrun_command(cfg, 0, module, module_args), env=torchrun_env(cfg)).returncode


def cmd_train(args: argparse.Namespace) -> int:
    from pliant.launch.worker import main as worker_main

    cfg = load_config(args.config)
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if launched or args.print_commands:
        return launch(cfg, "pliant.launch.worker", worker_args(args), worker_main, args.print_commands)
    node = place_node(cfg.cluster, getattr(args, "node_rank", None))
    if cfg.faults.enabled:
        from pliant.launch.supervisor import Supervisor

        return Supervisor(cfg, args.config, "pliant.launch.worker", worker_args(args, with_config=False),
                          args.run_dir, resume=args.resume, node=node).run()
    if cfg.cluster.nodes > 1:  # unsupervised: this node's torchrun
        cmd = torchrun_command(cfg, node.rank, "pliant.launch.worker", worker_args(args))
        return subprocess.run(cmd, env=torchrun_env(cfg)).returncode
    return launch(cfg, "pliant.launch.worker", worker_args(args), worker_main)
