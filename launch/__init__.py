"""Command line, config schema and launchers."""
