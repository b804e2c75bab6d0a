"""pliant.runtime (see DESIGN.md)."""
