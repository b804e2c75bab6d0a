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
from typing import Callable

from pliant.config import ConfigError, load_config, with_overrides
from pliant.launch.preflight import check_job
from pliant.launch.nodes import place_node
from pliant.launch.torchrun import config_args, torchrun_command, torchrun_env


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


def launch(cfg, module: str, module_args: list[str], rank_main: Callable[[list[str]], int],
           print_commands: bool = False, node_rank: int | None = None) -> int:
    """Run `module` on every rank of the config's cluster, unsupervised: in this process when a
    launcher already started it; else this node's torchrun (one node: node 0; several: the node
    --node-rank or Slurm names); with `print_commands`, print every node's command instead."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun / deepspeed / a scheduler
        return rank_main(module_args)
    c = cfg.cluster
    if print_commands:
        if c.nodes > 1 and not c.hosts:
            raise ConfigError(f"cluster.hosts: a {c.nodes}-node cluster needs one address per node to build the "
                              f"torchrun commands")
        for node in range(c.nodes):
            host = c.hosts[node] if c.hosts else "localhost"
            print(f"# node {node} ({host})")
            print(" ".join(shlex.quote(x) for x in torchrun_command(cfg, node, module, module_args)))
        return 0
    node = place_node(c, node_rank)
    return subprocess.run(torchrun_command(cfg, node.rank, module, module_args), env=torchrun_env(cfg)).returncode


def run_node(cfg, config_names: list[str], module: str, module_args: list[str], run_dir, node_rank: int | None = None,
             resume: bool = False) -> int:
    """This node's part of a job that runs `module` on every rank, as `pliant train` runs its
    worker: under the fault supervisor (its master on node 0, the monitor's agents in the ranks)
    when faults.enabled, else this node's torchrun. `module_args` without the config."""
    node = place_node(cfg.cluster, node_rank)
    if cfg.faults.enabled:
        from pliant.launch.supervisor import Supervisor

        return Supervisor(cfg, config_names, module, module_args, run_dir, resume=resume, node=node).run()
    args = config_args(config_names) + module_args + (["--resume"] if resume else [])
    return subprocess.run(torchrun_command(cfg, node.rank, module, args), env=torchrun_env(cfg)).returncode


def cmd_train(args: argparse.Namespace) -> int:
    from pliant.launch.worker import main as worker_main

    cfg = load_config(args.config)
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if launched or args.print_commands:
        return launch(cfg, "pliant.launch.worker", worker_args(args), worker_main, args.print_commands)
    # the whole job, as the ranks will see it, before anything starts: bad input is not a fault
    check_job(with_overrides(cfg, "train", steps=args.steps, plan=args.plan))
    return run_node(cfg, args.config, "pliant.launch.worker", worker_args(args, with_config=False), args.run_dir,
                    getattr(args, "node_rank", None), resume=args.resume)
