"""pliant.comm (see DESIGN.md)."""
