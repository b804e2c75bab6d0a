"""Heterogeneity-adaptive sequence-parallel planner (pure Python: numpy + PuLP, no torch).

Per global batch it chooses SP groups of mixed sizes and assigns every sequence to one,
minimising the step's makespan under device memory (FlexSP's formulation).
"""
from .baselines import Baselines, baselines, static_degree
from .core import Planner
from .cost import CostModel
from .errors import InvalidPlanError, PlanningError, SequenceTooLongError
from .lengths import get_distribution, load_length_file, presets, resolve_source, token_batches
from .plan import SOLO_FORM, GroupPlan, MicroBatchPlan, Plan, SolverStats, SPForm
from .service import PlanningService
from .spec import BandwidthSpec, ClusterSpec, CostSpec, ModelSpec, PlannerSpec
from .validate import plan_problems, validate_plan

__all__ = [
    "Baselines", "BandwidthSpec", "ClusterSpec", "CostModel", "CostSpec", "GroupPlan", "InvalidPlanError",
    "MicroBatchPlan", "ModelSpec", "Plan", "Planner", "PlannerSpec", "PlanningError", "PlanningService",
    "SOLO_FORM", "SPForm", "SequenceTooLongError", "SolverStats", "baselines", "get_distribution", "load_length_file", "plan_problems",
    "presets", "resolve_source", "static_degree", "token_batches", "validate_plan",
]
