"""megatron-core's indexed dataset module, the oracle for Megatron's on-disk format (CPU).

Imported once here: it warns that Transformer Engine and Apex are absent (harmless on CPU).
`needs_megatron` skips a test, naming why, only when megatron-core cannot be imported.
"""
from __future__ import annotations

import warnings

import pytest

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset as mcore
except ImportError as e:  # pragma: no cover - megatron-core is in the test extras
    mcore, MCORE_MISSING = None, f"megatron-core cannot be imported ({e}); it is the oracle for Megatron's format"
else:
    MCORE_MISSING = ""

needs_megatron = pytest.mark.skipif(mcore is None, reason=MCORE_MISSING or "megatron-core present")
