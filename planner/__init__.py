"""Heterogeneity-adaptive sequence-parallel planner (pure Python: numpy + PuLP, no torch)."""
