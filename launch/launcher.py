"""`pliant train`: start the job through torchrun.

* Launched already (torchrun, deepspeed or a scheduler set RANK and WORLD_SIZE): run this
  rank's worker in-process.
* A single-node config: run torchrun locally with one process per device.
* A multi-node config: `--print-commands` prints the torchrun command for each node (from
  `cluster.hosts`), to run on that node or hand to the scheduler.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from typing import Callable

from pliant.launch.config import ConfigError, load_config


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
                     monitor_interval_s: float | None = None) -> list[str]:
    c = cfg.cluster
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={c.devices_per_node}"]
    if monitor_interval_s is not None:
        cmd.append(f"--monitor-interval={monitor_interval_s:g}")
    if c.nodes == 1:
        cmd.append("--standalone")
    else:
        cmd += [f"--nnodes={c.nodes}", f"--node-rank={node_rank}", f"--master-addr={c.hosts[0]}",
                f"--master-port={c.port}"]
    return cmd + ["-m", module, *module_args]


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
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if c.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    return subprocess.run(torchrun_command(cfg, 0, module, module_args), env=env).returncode


def cmd_train(args: argparse.Namespace) -> int:
    from pliant.launch.worker import main as worker_main

    cfg = load_config(args.config)
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if cfg.faults.enabled and cfg.cluster.nodes == 1 and not launched and not args.print_commands:
        from pliant.launch.supervisor import Supervisor

        return Supervisor(cfg, args.config, "pliant.launch.worker", worker_args(args, with_config=False),
                          args.run_dir, resume=args.resume).run()
    return launch(cfg, "pliant.launch.worker", worker_args(args), worker_main, args.print_commands)
