"""Package layout: `pliant.*` imports, and the planner stays free of torch."""
from __future__ import annotations

import subprocess
import sys


def test_planner_imports_without_torch():
    code = ("import sys, pliant.planner as p; [getattr(p, n) for n in p.__all__]; "
            "assert 'torch' not in sys.modules, 'planner pulled in torch'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_namespaced_packages():
    import pliant.bench
    import pliant.comm
    import pliant.launch
    import pliant.planner
    import pliant.rl
    import pliant.runtime  # noqa: F401

    assert pliant.planner.__file__.replace("\\\\", "/").endswith("planner/__init__.py")
