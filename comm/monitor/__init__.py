"""C4-style monitoring of collective communication (docs/faults.md): the per-rank recorder
(agent side). The master and the fault injection build on it. The recorder (torch) is
imported on first use, so that the master and the config schema run without torch."""
import importlib
from typing import TYPE_CHECKING

__all__ = ["COLLECTIVES", "POINT_TO_POINT", "CollectiveEvent", "CollectiveRecorder"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(".recorder", __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from .recorder import COLLECTIVES, POINT_TO_POINT, CollectiveEvent, CollectiveRecorder
