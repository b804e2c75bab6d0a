"""The master's columns of completed collectives (docs/faults.md, "Agent" and "Master"): one
ring per process group, indexed by sequence number, that holds what each member reported
until every member has reported a collective; then a run of them is judged at once, with
array operations instead of a row per collective and member."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# a member that reported collectives this far past one it never reported lost it (its agent's
# queue overflowed): the group's judging goes on without it (async collectives may end out of order, closer)
LOST_AFTER = 64
MAX_WINDOW = 1 << 16  # sequence numbers one group may have open at once (members that far apart are lost anyway)


@dataclass
class Completed:
    """A run of collectives of one group that every member completed: arrays of shape
    (members, n), member i being group[i]; times on the master's clock."""

    group: tuple[int, ...]
    seq: np.ndarray  # (n,)
    sig: np.ndarray
    enter: np.ndarray
    exit: np.ndarray
    step: np.ndarray
    finite: np.ndarray  # 1 finite, 0 not, -1 unchecked
    ckpt: np.ndarray


def columns(block: list) -> tuple[tuple[int, ...], tuple[np.ndarray, ...]]:
    """An agent's block (agent.done_block) as (group, seq, sig, enter, exit, step, finite, ckpt)."""
    group, seq, sig, enter, exit_, step, finite, ckpt = block
    cols = (np.frombuffer(seq, np.int64), np.frombuffer(sig, np.int64), np.frombuffer(enter, np.float64),
            np.frombuffer(exit_, np.float64), np.frombuffer(step, np.int64), np.frombuffer(finite, np.int8),
            np.frombuffer(ckpt, np.int8))
    if len({len(c) for c in cols}) != 1:
        raise ValueError(f"a block of group {group} has columns of different lengths")
    return tuple(group), cols


class GroupRing:
    """One group's completed collectives, by sequence number, until all members reported them."""

    def __init__(self, group: tuple[int, ...], window: int = 256):
        self.group = group
        self.index = {r: i for i, r in enumerate(group)}
        self.base = 0  # the lowest sequence number not judged yet
        self.top = -1  # the highest any member reported
        self.last = np.full(len(group), -1, np.int64)  # per member: the highest it completed
        self._alloc(window)

    def _alloc(self, window: int) -> None:
        m = len(self.group)
        self.window = window
        self.have = np.zeros((m, window), bool)
        self.sig = np.zeros((m, window), np.int64)
        self.enter = np.zeros((m, window))
        self.exit = np.zeros((m, window))
        self.step = np.zeros((m, window), np.int64)
        self.finite = np.zeros((m, window), np.int8)
        self.ckpt = np.zeros((m, window), np.int8)

    def _arrays(self) -> tuple[np.ndarray, ...]:
        return self.have, self.sig, self.enter, self.exit, self.step, self.finite, self.ckpt

    def _grow(self, need: int) -> None:
        """A larger window, the open sequence numbers kept; beyond MAX_WINDOW the oldest open
        ones are given up (a member that far behind is silent, and the silence rules decide)."""
        if need > MAX_WINDOW:
            self.base = self.top - MAX_WINDOW // 2 + 1
            self.have[:] = False
            need = MAX_WINDOW
        window = self.window
        while window < need:
            window *= 2
        old, old_window = self._arrays(), self.window
        seqs = np.arange(self.base, self.top + 1)
        self._alloc(window)
        for new, prev in zip(self._arrays(), old):
            new[:, seqs % window] = prev[:, seqs % old_window]

    def put(self, rank: int, seq: np.ndarray, sig: np.ndarray, enter: np.ndarray, exit_: np.ndarray,
            step: np.ndarray, finite: np.ndarray, ckpt: np.ndarray) -> None:
        i = self.index.get(rank)
        if i is None or not len(seq):
            return
        self.last[i] = max(self.last[i], int(seq.max()))
        keep = seq >= self.base
        if not keep.all():  # a collective judged already (a rank's repeat): nothing new
            seq, sig, enter, exit_, step, finite, ckpt = (c[keep] for c in (seq, sig, enter, exit_, step, finite, ckpt))
            if not len(seq):
                return
        self.top = max(self.top, int(seq.max()))
        if self.top - self.base + 1 > self.window:
            self._grow(self.top - self.base + 1)
            keep = seq >= self.base
            seq, sig, enter, exit_, step, finite, ckpt = (c[keep] for c in (seq, sig, enter, exit_, step, finite, ckpt))
        at = seq % self.window
        self.have[i, at] = True
        self.sig[i, at] = sig
        self.enter[i, at] = enter
        self.exit[i, at] = exit_
        self.step[i, at] = step
        self.finite[i, at] = finite
        self.ckpt[i, at] = ckpt

    def completed(self) -> Completed | None:
        """The run of collectives from `base` that every member has reported, taken out of the
        ring; None if there is none yet."""
        n = self.top - self.base + 1
        if n <= 0:
            return None
        at = (self.base + np.arange(n)) % self.window
        full = self.have[:, at].all(axis=0)
        run = n if full.all() else int(np.argmin(full))
        while run == 0:  # the first open collective: lost if its missing members reported well past it
            missing = ~self.have[:, at[0]]
            if not (self.last[missing] > self.base + LOST_AFTER).all():
                return None
            self.have[:, at[0]] = False
            self.base += 1
            at, full, n = at[1:], full[1:], n - 1
            if n == 0:
                return None
            run = n if full.all() else int(np.argmin(full))
        at = at[:run]
        out = Completed(self.group, self.base + np.arange(run), self.sig[:, at], self.enter[:, at], self.exit[:, at],
                        self.step[:, at], self.finite[:, at], self.ckpt[:, at])
        self.have[:, at] = False
        self.base += run
        return out

    def reported(self, seq: int) -> dict[int, tuple[int, int, float]]:
        """The members that completed collective `seq` and have not been judged with the rest:
        rank -> (signature id, finite, enter)."""
        if seq < self.base or seq > self.top:
            return {}
        at = seq % self.window
        return {r: (int(self.sig[i, at]), int(self.finite[i, at]), float(self.enter[i, at]))
                for r, i in self.index.items() if self.have[i, at]}

    def done_by(self, seq: int) -> set[int]:
        """The members that completed collective `seq` (or a later one of this group)."""
        return {r for r, i in self.index.items() if self.last[i] >= seq}
