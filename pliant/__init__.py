"""pliant: a distributed training runtime that bends to its data.

Sub-packages: `pliant.planner` (sequence-parallel planning, no torch), `pliant.comm`
(SP collectives), `pliant.runtime` (training engine), `pliant.rl` (streaming RL on Ray),
`pliant.launch` (command line, config schema, launchers), `pliant.bench` (benchmarks).
"""

__version__ = "0.1.0"
