"""pliant.rl (see DESIGN.md)."""
