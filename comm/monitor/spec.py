"""The job config's `faults` section: monitoring thresholds, the response to faults, and
fault injection (docs/faults.md). Every threshold that decides an alarm is a factor over a
baseline the master measures (a collective's own duration, the agents' report gaps, the
other ranks' delays), with a floor in seconds so tiny baselines cannot make it twitchy."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

FaultKind = Literal["crash", "hang_before_collective", "hang_in_collective", "hold_gil", "sigstop", "slow",
                    "slow_link", "nan", "desync", "die_in_checkpoint", "slow_checkpoint", "jitter", "kill_rollout",
                    "raise", "raise_input_error", "master_error"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class InjectSpec(_Strict):
    """One injected fault: `kind` on global `rank` from training step `step` on.

    * crash: SIGKILL; hang_before_collective: block forever before the rank's `collective`-th
      collective of the step (the others wait in it); hang_in_collective: enter it and never
      leave (every rank ends up inside: a communication hang); hold_gil: sleep in C with the
      GIL held; sigstop: freeze the process;
    * slow: `seconds` extra per step from `step` on; slow_link: `seconds` extra on every
      point-to-point send from `rank` to `peer`; jitter: every step, a uniformly random
      extra in [0, `seconds`] (clean noise for the false-alarm check: it is not a fault);
    * nan: non-finite outputs (so gradients) on `rank` at `step`; desync: an extra
      collective of a different shape on `rank` at `step`;
    * die_in_checkpoint: SIGKILL after writing this rank's checkpoint files, before the
      checkpoint is complete; slow_checkpoint: `seconds` extra inside the checkpoint write;
    * kill_rollout: the RL rollout worker number `rank` is killed (ray.kill, no restart) once
      training reaches `step`;
    * raise: a RuntimeError at the start of `step` (the same text on every rank it is given
      for); raise_input_error: one of pliant's input errors (bad input, not a fault);
    * master_error: the fault monitor's master raises once some rank reports `step` (`rank` is
      not used): the job must go on unmonitored.
    """

    kind: FaultKind
    rank: NonNegativeInt
    step: PositiveInt = 1
    collective: NonNegativeInt = 0
    group_size: PositiveInt | None = None  # count only collectives of groups of this size (hangs)
    seconds: PositiveFloat = 1.0
    peer: NonNegativeInt | None = None
    attempt: NonNegativeInt = 0  # which start of the job it fires in (0: the first; restarts run clean)

    @model_validator(mode="after")
    def _consistent(self) -> "InjectSpec":
        if self.kind == "slow_link" and self.peer is None:
            raise ValueError("slow_link needs peer (the destination rank of the slow link)")
        if self.peer is not None and self.peer == self.rank:
            raise ValueError(f"peer={self.peer} is the faulty rank itself; a link needs two ranks")
        return self


class FaultSpec(_Strict):
    enabled: bool = True  # start the master and the agents under `pliant train`
    # agent summaries (they double as heartbeats) and the master's checks: every 0.5 s keeps the
    # monitor under 1% of the ranks' CPU on 4 small CPU ranks (every 0.2 s: 1.6%), with hangs
    # still named within 10 s (the silence threshold is then 5 s)
    report_interval_s: PositiveFloat = 0.5
    check_interval_s: PositiveFloat = 0.5  # how often the master classifies
    warmup_steps: NonNegativeInt = 2  # left out of baselines; alarms only with hang_warmup_s
    # silence: a rank whose summaries stop for heartbeat_factor x its usual report gap
    heartbeat_factor: PositiveFloat = 10.0
    heartbeat_min_s: PositiveFloat = 2.0
    # hangs: a collective in flight for hang_factor x the median duration of its (group, op),
    # and hang_max_factor x the longest one seen in clean steps
    hang_factor: PositiveFloat = 10.0
    hang_max_factor: PositiveFloat = 2.0
    hang_min_s: PositiveFloat = 2.0
    hang_warmup_s: PositiveFloat = 120.0  # before a baseline exists
    # progress evidence (progress.py): a rank is stuck when its main thread has grown its CPU
    # time by less than progress_cpu_s, moved no bytes and kept its Python stack for
    # progress_window_s (and on CUDA, when its queued work has not moved that long). A silent
    # or late rank that still progresses is slow, not hung; a silent one is called hung only
    # after busy_silence_max_s. A collective in which every member waits is still moving
    # while some member's other threads (gloo's) use more than moving_cpu_frac of a core
    progress_window_s: PositiveFloat = 2.0
    progress_cpu_s: PositiveFloat = 0.01
    moving_cpu_frac: PositiveFloat = 0.05
    busy_silence_max_s: PositiveFloat = 120.0
    # stragglers: the same rank is the last to arrive in straggler_share of the last
    # straggler_window steps, and its mean delay is straggler_factor x the others' mean; and
    # the chance that random arrival order (noise) makes some rank last that often is below
    # straggler_p (a binomial tail, over all ranks): with 4 ranks and a window of 6, only a
    # rank last in all 6 steps qualifies
    straggler_window: PositiveInt = 6
    straggler_share: float = Field(default=0.8, gt=0.5, le=1.0)
    straggler_p: float = Field(default=1e-3, gt=0.0, le=1.0)
    straggler_factor: PositiveFloat = 3.0
    straggler_min_s: PositiveFloat = 0.02
    # ... and it is late by at least straggler_steady x its mean delay in every step of the
    # window (a slow device is steadily late; random delays make the last rank's lead vary)
    straggler_steady: float = Field(default=0.5, ge=0.0, le=1.0)
    # slow links: a (src, dst) cell of the point-to-point latency matrix above
    # link_factor x the median cell, over at least link_samples transfers per cell
    link_factor: PositiveFloat = 5.0
    link_min_s: PositiveFloat = 0.005
    link_samples: PositiveInt = 6
    # response
    isolate_after_s: PositiveFloat | None = 20.0  # slow ranks/nodes persisting this long are isolated; null: never
    nan: Literal["skip", "rollback"] = "rollback"
    max_restarts: NonNegativeInt = 3
    # no spare slot left: restart on the healthy slots with a smaller world (the checkpoint is
    # loaded through DeepSpeed's universal form, the planner plans for the new world), down to
    # min_world ranks; false: stop instead
    shrink: bool = True
    min_world: PositiveInt = 1
    master_timeout_s: PositiveFloat = 10.0  # agents warn and go on unmonitored when the master is gone this long
    # multi-node jobs: the master listens on the first host at this port (null: cluster.port + 1)
    master_port: int | None = Field(default=None, ge=1, le=65535)
    stop_grace_s: PositiveFloat = 3.0  # SIGTERM, then SIGKILL, when stopping a faulty job
    # errors are not faults: a rank that raised an exception that is not one of pliant's input
    # errors waits this long before it exits, and the master as long for the other ranks: the
    # same exception on every rank ends the job (no restart), anything else is a crash
    same_error_s: PositiveFloat = 2.0
    inject: list[InjectSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _timing(self) -> "FaultSpec":
        if self.progress_window_s < 3 * self.report_interval_s:
            raise ValueError(f"progress_window_s = {self.progress_window_s:g} must be at least 3 x report_interval_s "
                             f"= {3 * self.report_interval_s:g}: a rank is judged stuck only over several reports")
        return self
