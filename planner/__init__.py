"""Heterogeneity-adaptive sequence-parallel planner (pure Python: numpy + PuLP, no torch).

Per global batch it chooses SP groups of mixed sizes and assigns every sequence to one,
minimising the step's makespan under device memory (FlexSP's formulation).
"""
import importlib
from typing import TYPE_CHECKING

# names -> submodule; imported on first use (PEP 562), so that what imports one light module
# (the fault monitor's master: planner.io's atomic writes) does not import numpy, PuLP and the
# config schema (0.6 s of the master's start)
_EXPORTS = {
    "Baselines": "baselines", "baselines": "baselines", "static_degree": "baselines",
    "Planner": "core", "CostModel": "cost",
    "InvalidPlanError": "errors", "PlanningError": "errors", "SequenceTooLongError": "errors",
    "get_distribution": "lengths", "load_length_file": "lengths", "presets": "lengths",
    "resolve_source": "lengths", "token_batches": "lengths",
    "SOLO_FORM": "plan", "GroupPlan": "plan", "MicroBatchPlan": "plan", "Plan": "plan", "SolverStats": "plan",
    "SPForm": "plan", "PlanningService": "service",
    "BandwidthSpec": "spec", "ClusterSpec": "spec", "CostSpec": "spec", "ModelSpec": "spec", "PlannerSpec": "spec",
    "plan_problems": "validate", "validate_plan": "validate",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # for type checkers and editors: the same names, imported eagerly
    from .baselines import Baselines, baselines, static_degree
    from .core import Planner
    from .cost import CostModel
    from .errors import InvalidPlanError, PlanningError, SequenceTooLongError
    from .lengths import get_distribution, load_length_file, presets, resolve_source, token_batches
    from .plan import SOLO_FORM, GroupPlan, MicroBatchPlan, Plan, SolverStats, SPForm
    from .service import PlanningService
    from .spec import BandwidthSpec, ClusterSpec, CostSpec, ModelSpec, PlannerSpec
    from .validate import plan_problems, validate_plan
