"""One rank's side of fault handling, as the worker uses it: the collective recorder, the
agent that reports to the master, and fault injection (docs/faults.md).

The launcher's supervisor tells a rank where the master is (PLIANT_MONITOR_ADDR, or the file
the master writes it to: PLIANT_MONITOR_ADDR_FILE), which
start of the job this is (PLIANT_ATTEMPT) and which device slot each local rank runs on
(PLIANT_SLOTS). Without a master address the agent stays off; injected faults still fire.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from pliant.comm.monitor.address import master_address
from pliant.comm.monitor.agent import Agent
from pliant.comm.monitor.recorder import CollectiveRecorder
from pliant.comm.monitor.spec import FaultSpec
from pliant.planner.errors import InputError

from .faults import FaultInjector, faults_from_env

ATTEMPT_ENV = "PLIANT_ATTEMPT"
SLOTS_ENV = "PLIANT_SLOTS"


class NonFiniteLoss(RuntimeError):
    """The step's loss is NaN/Inf and faults.nan is rollback: the job restarts from the last checkpoint."""


def my_slot() -> int | None:
    slots = os.environ.get(SLOTS_ENV)
    if not slots:
        return None
    return int(slots.split(",")[int(os.environ.get("LOCAL_RANK", "0"))])


class RankMonitor:
    """The fault monitor's side in one rank: made before DeepSpeed starts, attached to the
    trainer as a callback (step marks for the recorder, injected faults, the loss check)."""

    def __init__(self, spec: FaultSpec, run_dir: Path | None):
        self.spec = spec
        self.rank = int(os.environ.get("RANK", "0"))
        self.attempt = int(os.environ.get(ATTEMPT_ENV, "0"))
        self.slot = my_slot()
        self.injector = FaultInjector(list(spec.inject) + faults_from_env(), self.rank, self.attempt, run_dir)
        addr = master_address() if spec.enabled else None
        self.recorder: CollectiveRecorder | None = None
        self.agent: Agent | None = None
        if addr or self.injector:
            # before DeepSpeed starts: it binds some torch.distributed functions at initialisation
            self.recorder = CollectiveRecorder(check_finite=bool(addr)).install()
            if self.injector:
                self.recorder.hook = self.injector
        if addr:
            self.agent = Agent(self.recorder, addr, self.rank, spec, self.slot, self.attempt).start()

    def attach(self, trainer) -> None:
        """Injected NaN on the model; with faults.nan = skip, DeepSpeed's ZeRO optimizer checks
        the reduced gradients and skips a step whose gradients are not finite."""
        self.injector.attach(trainer.engine.module)
        if self.spec.nan == "skip":
            opt = trainer.engine.optimizer
            if not hasattr(opt, "check_grad_overflow"):
                raise InputError(f"faults.nan = skip needs a DeepSpeed ZeRO stage 1 or 2 optimizer (model.zero_stage "
                                 f"is {trainer.model_spec.zero_stage}); use faults.nan = rollback")
            opt.check_grad_overflow = True

    def begin_step(self, step: int) -> None:
        if self.recorder is not None:
            self.recorder.mark_step(step)
        self.injector.on_step(step)

    def checkpoint_stage(self, stage: str) -> None:
        if self.recorder is not None:
            self.recorder.checkpointing(stage != "done")
        self.injector.on_checkpoint(stage)

    def pause(self, active: bool) -> None:
        """A wait outside the collective schedule that the job declares (the RL learner's rank 0
        waiting for rollouts while its peers wait in the next broadcast): the master leaves it
        out of its alarms as it does a checkpoint write."""
        if self.recorder is not None:
            self.recorder.checkpointing(active)

    def check_loss(self, step: int, loss: float, skipped: bool) -> None:
        if loss == loss and abs(loss) != float("inf"):
            return
        if self.spec.nan == "rollback":
            raise NonFiniteLoss(f"step {step}: the loss is {loss}; faults.nan = rollback: restart from the last "
                                f"complete checkpoint")
        if self.rank == 0:
            print(f"pliant: step {step}: non-finite loss {loss}; the update was {'skipped' if skipped else 'APPLIED'}"
                  f" (faults.nan = skip)", file=sys.stderr, flush=True)

    # ----- as a trainer callback (runtime/callbacks.py) -----
    def on_train_start(self, trainer) -> None:
        self.attach(trainer)

    def on_step_start(self, trainer, step: int) -> None:
        self.begin_step(step)
        self._skipped = trainer.engine.skipped_steps

    def on_step_end(self, trainer, result) -> None:
        self.check_loss(result.step, result.loss, trainer.engine.skipped_steps > self._skipped)

    def on_train_end(self, trainer, error) -> None: ...

    def close(self, reason: str = "finished") -> None:
        if self.agent is not None:
            self.agent.close(reason)
        if self.recorder is not None:
            self.recorder.uninstall()

    def close_on(self, error: BaseException) -> None:
        """Tell the master why this rank stops (docs/faults.md, "Errors are not faults"): one of
        pliant's input errors ("error: ...": the job ends at once, no restart) or another
        exception ("exception: ..."). For the latter the rank lingers `same_error_s` before its
        process exits, so that the launcher's stop of its peers does not pre-empt them raising the
        same: the same exception on every rank ends the job too, anything else is a crash."""
        text = f"{type(error).__name__}: {error}"[:500]
        monitored = self.agent is not None
        self.close(f"error: {text}" if isinstance(error, InputError) else f"exception: {text}")
        if monitored and isinstance(error, Exception) and not isinstance(error, InputError):
            time.sleep(self.spec.same_error_s)
