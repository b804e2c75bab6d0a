"""The torchrun command line and environment of one node's ranks, shared by the launcher
(launch/launcher.py) and the supervisor's restart loop (launch/supervisor.py). The launcher
starts the supervisor, so the import between those two goes one way.

The command is torchrun's own (torch.distributed.run) through launch/elastic.py, which forks the
workers from a fork server that imported torch, TorchDynamo and DeepSpeed once for all ranks
(`--run-path --start-method forkserver`); $PLIANT_PRELOAD=0 gives the plain `-m torch.distributed.run
... -m MODULE` instead."""
from __future__ import annotations

import importlib.util
import os
import sys

PRELOAD_ENV = "PLIANT_PRELOAD"


def config_args(names: list[str]) -> list[str]:
    """`--config A --config B ...`: the config files (base, then overlays) for a rank's command line."""
    return [x for name in names for x in ("--config", str(name))]


def preloaded() -> bool:
    """Whether the ranks are forked from a preloaded fork server ($PLIANT_PRELOAD, default on)."""
    return os.environ.get(PRELOAD_ENV, "1") not in ("0", "false", "no", "off")


def torchrun_command(cfg, node_rank: int, module: str, module_args: list[str],
                     monitor_interval_s: float | None = None, rdzv_id: str = "pliant",
                     local_addr: str | None = None) -> list[str]:
    """torchrun for one node: standalone on one node; on several, c10d rendezvous on the first
    host, which node 0 hosts (`is_host`), each node advertising its own address (`local_addr`,
    else its cluster.hosts entry) so that no node takes a hostname that resolves to loopback."""
    c = cfg.cluster
    cmd = [f"--nproc-per-node={c.devices_per_node}"]
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
    return _command(cmd, module, module_args)


def local_command(world: int, module: str, module_args: list[str]) -> list[str]:
    """torchrun of `world` ranks on this machine running `module` (standalone rendezvous),
    forked from the preloaded fork server unless $PLIANT_PRELOAD=0: for tests and benches
    that start ranks without a config's cluster."""
    return _command(["--standalone", f"--nproc-per-node={world}"], module, module_args)


def _command(options: list[str], module: str, module_args: list[str]) -> list[str]:
    """torchrun with `options` running `module`: its file run as __main__ in a fork of the
    preloaded server (launch/elastic.py), or with $PLIANT_PRELOAD=0 plain torchrun's `-m module`."""
    if preloaded():
        return [sys.executable, "-m", "pliant.launch.elastic", *options, "--start-method=forkserver", "--run-path",
                module_file(module), *module_args]
    return [sys.executable, "-m", "torch.distributed.run", *options, "-m", module, *module_args]


def module_file(module: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise ModuleNotFoundError(f"no module named {module!r} to run on the ranks")
    return spec.origin


def torchrun_env(cfg) -> dict[str, str]:
    """The environment torchrun and its workers start with: one thread per rank unless set,
    DeepSpeed's CPU accelerator on CPU clusters, unbuffered output (forked workers do not get
    torchrun's `python -u`), torch's NVML device count (no CUDA context in the fork server),
    transformers in the preload for a Hugging Face model, and TorchDynamo off unless set: pliant
    compiles nothing, and DeepSpeed wraps a function it never runs here (its Muon optimizer's
    Newton-Schulz step) in torch.compile while it checks the optimizer, which imports dynamo
    and inductor: 2.5 s of CPU per rank at start-up (TORCHDYNAMO_DISABLE=0 keeps it on)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "TORCHDYNAMO_DISABLE": os.environ.get("TORCHDYNAMO_DISABLE", "1"), "PYTHONUNBUFFERED": "1",
           "PYTORCH_NVML_BASED_CUDA_CHECK": os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK", "1")}
    if cfg.cluster.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    if cfg.model.hf_path is not None:
        env["PLIANT_PRELOAD_EXTRA"] = "transformers,pliant.runtime.gdn"
    return env
