"""What every RL worker shares: its log line and its busy/idle clock."""
from __future__ import annotations

import sys
import time


def log(msg: str) -> None:
    print(f"pliant rl: {msg}", file=sys.stderr, flush=True)


class Timed:
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


def actor_device():
    """The device Ray gave this actor: its first GPU when it holds one, else the CPU."""
    import ray
    import torch

    return torch.device("cuda", 0) if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")
