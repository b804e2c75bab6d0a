"""pliant: a distributed training runtime that bends to its data.

Sub-packages: `pliant.planner` (sequence-parallel planning, no torch), `pliant.comm`
(SP collectives), `pliant.runtime` (training engine), `pliant.rl` (streaming RL on Ray),
`pliant.config` (the job-config schema), `pliant.io` (atomic writes, strict JSON), `pliant.bench`
(benchmarks, run reports), `pliant.launch` (command line, launchers).
"""

__version__ = "0.1.0"
