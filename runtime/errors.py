"""Runtime errors the command line reports as `pliant: error: ...` (importable without torch)."""
from __future__ import annotations


class ExportError(RuntimeError):
    """A run or checkpoint that cannot be exported; the message names it and why."""
