#!/usr/bin/env bash
# Creates .venv (if missing) and installs pliant into it, editable, with HiGHS, the test extras and the bench extras (torchft).
# torch is pinned first: on these machines `torch==2.13.0` resolves to the local CPU wheel,
# while an unpinned torch would pull several GB of CUDA packages.
# Set PLIANT_TORCH to choose another torch requirement (e.g. a CUDA build on a GPU cluster).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install "${PLIANT_TORCH:-torch==2.13.0}"
"${PIP[@]}" install -e ".[highs,test,bench]"
