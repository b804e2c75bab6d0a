#!/usr/bin/env bash
# The first thing to run on a GPU (issue 31), one command of at most 8 minutes on one H100:
#
#   bash scripts/gpu-check.sh [OUT.json]        (default: gpu-check.json)
#
# 1. the CUDA tests: pliant's fused kernels against the torch path (tests/test_comm_kernels.py)
#    and the monitor's recorder on CUDA events (tests/test_monitor_recorder_cuda.py);
# 2. a one-GPU `pliant train` job's steps under torch.profiler (`pliant bench gpu-step`,
#    configs/faults-1gpu.yaml): the GPU's busy fraction and kernel launches per pass;
# and writes one JSON with both. Its exit status is non-zero when a test failed or the step
# could not be measured.
#
# The Python: $PLIANT_PYTHON, else this checkout's .venv, else python3 -- the first whose torch
# sees a CUDA device. pliant goes into it without touching its torch (pip --no-deps); pliant's
# other dependencies come from the index, or from ./.whl where the machine has no network.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check.json}
START=$(date +%s)

PY=""
for cand in "${PLIANT_PYTHON:-}" .venv/bin/python python3; do
    [ -n "$cand" ] || continue
    if "$cand" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        PY=$cand
        break
    fi
done
if [ -z "$PY" ]; then
    echo "gpu-check: no Python here has a torch that sees a CUDA device (tried \$PLIANT_PYTHON, .venv, python3)" >&2
    exit 2
fi
echo "gpu-check: $("$PY" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())') ($PY)"

if ! "$PY" -c "import pliant, deepspeed, pulp, pydantic, zmq, msgpack, py_spy" 2>/dev/null; then
    FIND=()
    [ -d .whl ] && FIND=(--no-index --find-links .whl)
    "$PY" -m pip install --quiet --no-deps -e . || exit 2
    "$PY" -m pip install --quiet "${FIND[@]}" "deepspeed>=0.15" "pulp>=3.3,<4" "pydantic>=2.5" "pyzmq>=25" \
        "msgpack>=1.0" "py-spy>=0.3.14" "pytest-timeout" || {
        echo "gpu-check: pliant's dependencies are missing and cannot be installed (no network: carry wheels in ./.whl)" >&2
        exit 2
    }
fi

# the fused kernels' packages (fla, flash-attn): their tests skip, and say so in the JSON, without them
for pkg in "fla:flash-linear-attention" "flash_attn:flash-attn"; do
    if ! "$PY" -c "import ${pkg%%:*}" 2>/dev/null; then
        FIND=()
        [ -d .whl ] && FIND=(--no-index --find-links .whl)
        "$PY" -m pip install --quiet --no-deps "${FIND[@]}" "${pkg#*:}" 2>/dev/null ||
            echo "gpu-check: ${pkg#*:} is not installed and cannot be: its kernel's tests will skip" >&2
    fi
done

WORK=$(mktemp -d)
timeout 300 "$PY" -m pytest -q -n 0 -p no:cacheprovider -o addopts="" --timeout 240 \
    tests/test_comm_kernels.py tests/test_monitor_recorder_cuda.py --junitxml "$WORK/cuda-tests.xml"
TESTS_RC=$?
timeout 240 "$PY" -m pliant.launch.cli bench gpu-step --config configs/faults-1gpu.yaml --out "$WORK/gpu-step.json"
STEP_RC=$?

"$PY" - "$WORK" "$OUT" "$TESTS_RC" "$STEP_RC" "$START" <<'PYEOF'
import json, os, sys, time
import xml.etree.ElementTree as ET
from pathlib import Path

work, out, tests_rc, step_rc, start = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
tests = {"rc": tests_rc, "cases": []}
if (work / "cuda-tests.xml").is_file():
    for case in ET.parse(work / "cuda-tests.xml").iter("testcase"):
        status = "failed" if case.find("failure") is not None or case.find("error") is not None else \
            "skipped" if case.find("skipped") is not None else "passed"
        tests["cases"].append({"test": f"{case.get('classname')}::{case.get('name')}", "status": status,
                               "seconds": float(case.get("time", 0))})
counts = {k: sum(c["status"] == k for c in tests["cases"]) for k in ("passed", "failed", "skipped")}
step = json.loads((work / "gpu-step.json").read_text()) if (work / "gpu-step.json").is_file() else None
body = {"check": "gpu", "seconds": round(time.time() - start, 1), "tests": {**counts, **tests},
        "step": step, "step_rc": step_rc}
tmp = out.with_name(out.name + ".tmp")
tmp.write_text(json.dumps(body, indent=1))
os.replace(tmp, out)
s = (step or {}).get("summary", {})
print(f"gpu-check: CUDA tests {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped; "
      f"step {s.get('step_s_median')} s, GPU busy {s.get('gpu_busy_fraction')}, kernel launches per pass "
      f"{s.get('kernel_launches_per_pass')}; {body['seconds']} s; wrote {out}")
sys.exit(0 if tests_rc == 0 and step_rc == 0 and counts["failed"] == 0 and counts["passed"] > 0 else 1)
PYEOF
