"""Command line and launchers (the config schema is `pliant.config`)."""
