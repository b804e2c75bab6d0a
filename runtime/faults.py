"""Fault injection (docs/faults.md): makes a chosen rank fail in a chosen way at a chosen
step, so that every fault class the monitor knows can be produced on CPU ranks.

Faults come from the config's `faults.inject` list and from the environment variable
PLIANT_FAULT (a JSON object or list of objects with the same keys). A fault fires only in
the start of the job named by its `attempt` (default 0, the first): a restarted job runs
clean, as it would on healthy hardware. Before striking, the injector writes
RUN_DIR/faults/fired-a{attempt}-r{rank}-{kind}.json with the wall and monotonic time, so a
test can measure detection latency from the real moment of the fault.
"""
from __future__ import annotations

import ctypes
import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from pydantic import TypeAdapter

from pliant.comm.monitor.recorder import SENDS, CollectiveEvent, CollectiveHook
from pliant.comm.monitor.spec import InjectSpec
from pliant.planner.errors import InputError
from pliant.io import atomic_write_text

from .rank import rank_device

FAULT_ENV = "PLIANT_FAULT"
_FAULTS = TypeAdapter(list[InjectSpec])


def faults_from_env() -> list[InjectSpec]:
    text = os.environ.get(FAULT_ENV, "").strip()
    if not text:
        return []
    data = json.loads(text)
    return _FAULTS.validate_python(data if isinstance(data, list) else [data])


class FaultInjector(CollectiveHook):
    def __init__(self, faults: list[InjectSpec], rank: int, attempt: int, run_dir: Path | None = None):
        self.faults = [f for f in faults if f.rank == rank and f.attempt == attempt]
        self.rank, self.attempt, self.run_dir = rank, attempt, run_dir
        self.step = 0
        self._counted = 0  # matching collectives entered this step (hang faults)
        self._computing = False  # slow / jitter applied this step
        self._fired: set[tuple[str, int]] = set()
        self._jitter = random.Random(1000 + rank)

    def __bool__(self) -> bool:
        return bool(self.faults)

    def _due(self, kind: str, every_step: bool = False) -> list[InjectSpec]:
        return [f for f in self.faults if f.kind == kind and (self.step >= f.step if every_step else
                                                              self.step == f.step)]

    def _fire(self, f: InjectSpec, **info) -> None:
        """Write down the moment of the fault (once per fault), then let it happen."""
        key = (f.kind, f.step)
        if key in self._fired:
            return
        self._fired.add(key)
        if self.run_dir is None:
            return
        body = {"kind": f.kind, "rank": self.rank, "step": self.step, "attempt": self.attempt, "wall": time.time(),
                "mono": time.monotonic(), **info}
        atomic_write_text(self.run_dir / "faults" / f"fired-a{self.attempt}-r{self.rank}-{f.kind}.json",
                          json.dumps(body))

    # ----- step boundaries -----
    def on_step(self, step: int) -> None:
        self.step, self._counted, self._computing = step, 0, False
        for f in self._due("crash"):
            self._fire(f)
            os.kill(os.getpid(), signal.SIGKILL)
        for f in self._due("sigstop"):
            self._fire(f)
            os.kill(os.getpid(), signal.SIGSTOP)
        for f in self._due("hold_gil"):
            self._fire(f)
            ctypes.PyDLL(None).sleep(100000)  # a C call that keeps the GIL: no other thread runs
        for f in self._due("raise"):
            self._fire(f)
            raise RuntimeError(f"injected error at step {step}")
        for f in self._due("raise_input_error"):
            self._fire(f)
            raise InputError(f"injected input error at step {step}")
        for f in self._due("desync"):
            self._fire(f)
            on = rank_device("cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(torch.zeros(3, dtype=torch.float32, device=on))  # the others issue something else

    # ----- collectives -----
    def _counts(self, f: InjectSpec, group: tuple[int, ...]) -> bool:
        return f.group_size is None or len(group) == f.group_size

    def _slow_compute(self, op: str) -> None:
        """slow / jitter: extra time in the step's compute, after the plan arrived (so the
        delay shows where a slow device shows it: before the first collective of the work)."""
        if self._computing or op == "broadcast_object_list":
            return
        self._computing = True
        for f in self._due("slow", every_step=True):
            self._fire(f, seconds=f.seconds)
            time.sleep(f.seconds)
        for f in self._due("jitter", every_step=True):
            self._fire(f, seconds=f.seconds)
            time.sleep(self._jitter.uniform(0.0, f.seconds))

    def before_enter(self, op: str, group: tuple[int, ...], peer: int | None) -> None:
        self._slow_compute(op)
        if peer is not None:
            return
        for f in self._due("hang_before_collective"):
            if self._counts(f, group) and self._counted == f.collective:
                self._fire(f, op=op, group=list(group))
                threading.Event().wait()  # never enters: the others wait for it

    def after_enter(self, event: CollectiveEvent) -> None:
        if event.peer is not None:
            for f in self._due("slow_link", every_step=True):
                if event.op in SENDS and event.peer == f.peer:
                    self._fire(f, peer=f.peer, seconds=f.seconds)
                    time.sleep(f.seconds)
            return
        for f in self._due("hang_in_collective"):
            if self._counts(f, event.group) and self._counted == f.collective:
                self._fire(f, op=event.op, group=list(event.group), seq=event.seq)
                threading.Event().wait()  # entered, never leaves: the collective hangs for everyone
        if any(self._counts(f, event.group) for f in self.faults if f.kind.startswith("hang")):
            self._counted += 1

    # ----- checkpoints and numerics -----
    def on_checkpoint(self, stage: str) -> None:
        if stage != "written":
            return
        for f in self._due("slow_checkpoint"):
            self._fire(f, seconds=f.seconds)
            time.sleep(f.seconds)
        for f in self._due("die_in_checkpoint"):
            self._fire(f)
            os.kill(os.getpid(), signal.SIGKILL)

    def attach(self, module: torch.nn.Module) -> None:
        """nan: the model's outputs (so its gradients) turn non-finite on this rank at the step."""
        if not self._due_any("nan"):
            return

        def poison(_module, _inputs, output):
            for f in self._due("nan"):
                self._fire(f)
                return output * float("nan")
            return output

        module.register_forward_hook(poison)

    def _due_any(self, kind: str) -> bool:
        return any(f.kind == kind for f in self.faults)


FAIL_AT_STEP_ENV = "PLIANT_FAIL_AT_STEP"


class FailAtStep:
    """Test hook (a trainer callback): rank 0 dies with exit status 17 right after step N's
    checkpoint, before its metrics line, as a crash between steps would (PLIANT_FAIL_AT_STEP=N)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_start(self, trainer) -> None: ...

    def on_step_start(self, trainer, step: int) -> None: ...

    def on_step_end(self, trainer, result) -> None:
        if result.step == self.step and trainer.rank == 0:
            os._exit(17)

    def on_train_end(self, trainer, error) -> None: ...


def test_hooks_from_env() -> list:
    """The fault-injection callbacks the environment asks for (none in a normal run)."""
    step = int(os.environ.get(FAIL_AT_STEP_ENV, "0"))
    return [FailAtStep(step)] if step else []


class MasterFaults:
    """The `master_error` faults of PLIANT_FAULT, for the master's thread (the supervisor
    passes it as the master's `tick`): raises once a rank has reported the fault's step, in
    the start named by its `attempt`."""

    KIND = "master_error"

    def __init__(self, faults: list[InjectSpec]):
        self.faults = [f for f in faults if f.kind == self.KIND]

    def __bool__(self) -> bool:
        return bool(self.faults)

    def __call__(self, picture) -> None:
        step = max((st.step for st in picture.ranks.values()), default=0)
        for f in self.faults:
            if f.attempt == picture.attempt and step >= f.step:
                raise RuntimeError(f"injected master error at step {step} (fault injection)")


# ----- RL rollout workers -----


class RolloutFaults:
    """Fault injection for an RL run (`pliant rl`): the `kill_rollout` faults of the same
    InjectSpec list (PLIANT_FAULT; the RL config has no `faults` section). The runner calls
    `on_step` as training progresses; a fault kills rollout worker `rank` (ray.kill, no
    restart: the runner sees it die and starts it again) once training reaches `step`. It
    fires once, in the worker's incarnation named by `attempt` (default 0, the first start):
    the restarted worker runs clean. Before striking it writes
    RUN_DIR/faults/fired-a{attempt}-r{rank}-kill_rollout.json, as FaultInjector does. With no
    such faults it does nothing. Ray is imported only when a fault fires."""

    KIND = "kill_rollout"

    def __init__(self, faults: list[InjectSpec], run_dir: Path | None = None, log=None):
        self.faults = [f for f in faults if f.kind == self.KIND]
        self.run_dir, self.log = run_dir, log
        self._fired: set[int] = set()  # indices into self.faults

    @classmethod
    def from_env(cls, run_dir: Path | None = None, log=None) -> "RolloutFaults":
        return cls(faults_from_env(), run_dir, log)

    def __bool__(self) -> bool:
        return bool(self.faults)

    def on_step(self, step: int, workers: dict, incarnations: dict | None = None) -> None:
        """`step`: the steps trained so far; `workers`: rollout worker number -> its Ray actor;
        `incarnations`: worker number -> how many times it was started again (0 if absent)."""
        for i, f in enumerate(self.faults):
            if i in self._fired or step < f.step:
                continue
            if f.rank not in workers:
                self._fired.add(i)
                self._say(f"fault injection: no rollout worker {f.rank} (there are {len(workers)}); "
                          f"{self.KIND} at step {f.step} ignored")
                continue
            if (incarnations or {}).get(f.rank, 0) != f.attempt:
                continue
            self._fired.add(i)
            self._record(f, step)
            self._say(f"killing rollout worker {f.rank} at step {step} (fault injection)")
            import ray  # only here: training ranks import this module without Ray

            ray.kill(workers[f.rank], no_restart=True)

    def _record(self, f: InjectSpec, step: int) -> None:
        if self.run_dir is None:
            return
        body = {"kind": f.kind, "rank": f.rank, "step": step, "attempt": f.attempt, "wall": time.time(),
                "mono": time.monotonic()}
        atomic_write_text(self.run_dir / "faults" / f"fired-a{f.attempt}-r{f.rank}-{f.kind}.json",
                          json.dumps(body))

    def _say(self, msg: str) -> None:
        if self.log is not None:
            self.log(msg)
        else:
            import sys

            print(f"pliant: {msg}", file=sys.stderr, flush=True)
