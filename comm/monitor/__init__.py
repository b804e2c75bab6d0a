"""C4-style monitoring of collective communication (docs/faults.md): the per-rank recorder
(agent side). The master and the fault injection build on it."""
from .recorder import COLLECTIVES, POINT_TO_POINT, CollectiveEvent, CollectiveRecorder

__all__ = ["COLLECTIVES", "POINT_TO_POINT", "CollectiveEvent", "CollectiveRecorder"]
