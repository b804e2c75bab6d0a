"""pliant.rl (see docs/architecture.md)."""
