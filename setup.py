"""Distribution `pliant`.

The top-level folders are installed under one import namespace, `pliant.*`, because
their bare names (`comm`, `runtime`, `planner`, `rl`, `launch`) are taken on PyPI.
`pip install .` and `pip install -e .` both give `import pliant.planner`.
"""
from setuptools import find_packages, setup

PARTS = ["planner", "comm", "runtime", "rl", "launch", "bench"]
SUBPACKAGES = {f"pliant.{p}.{sub}": f"{p}/{sub.replace('.', '/')}" for p in PARTS for sub in find_packages(p)}

setup(
    name="pliant",
    version="0.1.0",
    description="Distributed training runtime for long-context and RL post-training of LLMs",
    python_requires=">=3.10",
    packages=["pliant"] + [f"pliant.{p}" for p in PARTS] + list(SUBPACKAGES) + ["pliant.configs"],
    package_dir={"pliant": "pliant", **{f"pliant.{p}": p for p in PARTS}, **SUBPACKAGES, "pliant.configs": "configs"},
    package_data={"pliant.planner": ["presets/*.json"], "pliant.configs": ["*.yaml"]},
    install_requires=[
        "torch>=2.3",  # scripts/setup.sh pins torch==2.13.0 before this runs
        "deepspeed>=0.15",
        "ray>=2.9",
        "pulp>=3.3,<4",  # 4.x drops the bundled CBC binary,
        "numpy>=1.24",
        "pyzmq>=25",
        "msgpack>=1.0",
        "psutil>=5.9",  # the fault monitor's process watch
        "py-spy>=0.3.14",  # a hung rank's Python stack, read from outside without its GIL
        "pydantic>=2.5",
        "pyyaml>=6",
        "rich>=13",
        "matplotlib>=3.7",
        # the Hugging Face ecosystem: model directories in and out, tokenizers, corpora
        "transformers>=4.56",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "pyarrow>=19",  # pyarrow.json.open_json (streamed JSONL); JSONL / JSONL.gz / Parquet reading for `pliant data prepare`
        "tensorboard>=2.14",  # train.tensorboard
    ],
    extras_require={
        # the planner's MILP uses HiGHS when present, else PuLP's bundled CBC; highspy 1.16 prints its
        # banner to stdout on every new solver, before PuLP can turn its output off
        "highs": ["highspy>=1.7,<1.16"],
        # ray[default]: the dashboard's job server, for the `ray job submit -- pliant rl` test
        "test": ["pytest>=8", "pytest-timeout>=2.2", "pytest-xdist>=3.5", "hypothesis>=6.100", "ray[default]>=2.9",
                 # the oracle for Megatron's indexed dataset format (CPU)
                 "megatron-core>=0.12",
                 # fla's pure-torch naive simple-GLA recurrence: the fused linear path's contract on CPU
                 "fla-core>=0.6"],
        "bench": ["torchft>=0.2"],  # pliant bench faults runs torchft side by side
        # fused varlen kernels for the SP operators' local attention on CUDA (comm/kernels.py): fla's
        # chunk_simple_gla (triton) and flash-attn's varlen kernel (built against the installed CUDA torch:
        # pip install "pliant[cuda]" --no-build-isolation)
        "cuda": ["fla-core[cuda]>=0.6", "flash-attn>=2.6"],
    },
    entry_points={"console_scripts": ["pliant=pliant.launch.cli:main"]},
)
