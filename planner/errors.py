"""Errors the planner raises for input it cannot plan."""
from __future__ import annotations


class InputError(ValueError):
    """The job's input is wrong: its config, data, model directory or checkpoint, not the
    machines. Every pliant error class for bad input derives from it; a rank that raises one
    ends the job at once, with its message and no restart (docs/faults.md, "Errors are not
    faults")."""


class PlanningError(InputError):
    """The batch cannot be planned on this cluster; the message says why."""


class SequenceTooLongError(PlanningError):
    def __init__(self, length: int, seq_id: int, longest_supported: int, largest_group: int):
        self.length, self.seq_id = length, seq_id
        self.longest_supported, self.largest_group = longest_supported, largest_group
        super().__init__(
            f"sequence {seq_id} has {length} tokens, but the longest sequence this cluster can hold is "
            f"{longest_supported} tokens (in a group of {largest_group} devices); truncate it (--max-len) "
            f"or plan for more or larger devices"
        )

    def __reduce__(self):  # keep the fields across processes (the planning service pickles errors)
        return (type(self), (self.length, self.seq_id, self.longest_supported, self.largest_group))


class InvalidPlanError(AssertionError):
    """A plan breaks one of the invariants in `validate_plan`."""
