"""pliant.runtime (see docs/architecture.md)."""
