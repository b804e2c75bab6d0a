"""Strict JSON (RFC 8259) everywhere: a figure that is not finite is written as null, never as
the bare Infinity or NaN that Python's json writes by default and other parsers reject."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pliant.io import strict_dumps

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def strict_loads(text: str):
    def refuse(constant: str):
        raise ValueError(f"not strict JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def test_non_finite_figures_are_null():
    body = {"inf": float("inf"), "nan": [np.float64("nan"), 1.5], "array": np.arange(3), "pair": (1, -np.inf),
            "nested": {"x": np.float32(2.5), "y": [float("-inf")]}}
    assert strict_loads(strict_dumps(body)) == {"inf": None, "nan": [None, 1.5], "array": [0, 1, 2],
                                                "pair": [1, None], "nested": {"x": 2.5, "y": [None]}}


def test_a_strict_parser_refuses_what_json_writes_by_default():
    with pytest.raises(ValueError, match="Infinity"):
        strict_loads(json.dumps({"x": float("inf")}))


@pytest.mark.parametrize("path", sorted(RESULTS.rglob("*.json")), ids=lambda p: p.name)
def test_every_stored_bench_result_is_strict(path):
    strict_loads(path.read_text())
