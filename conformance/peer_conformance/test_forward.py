"""SPEC §3 Forward: the backend computes the reference's output, state and aux."""

import numpy as np
import pytest
from hypothesis import given

from .helpers import MIXED, check_forward, needs, needs_mode, run_backend
from .strategies import SECONDARY, cases

SECTION = "§3 Forward"


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
@given(case=cases())
def test_forward_matches_reference(backend, dtype, case):
    needs(backend, dtype)
    check_forward(backend, case, dtype)


@pytest.mark.parametrize(("dtype", "compute_dtype"), [("float16", None)] + MIXED)
@SECONDARY
@given(case=cases())
def test_forward_matches_reference_low_precision(backend, dtype, compute_dtype, case):
    """float16 parameters (SPEC §10.1) and the mixed modes (SPEC §10.3)."""
    needs_mode(backend, dtype, compute_dtype)
    check_forward(backend, case, dtype, compute_dtype=compute_dtype)


@SECONDARY
@given(case=cases())
def test_forward_is_deterministic(backend, case):
    dtype = "float64" if "float64" in backend.capabilities else "float32"
    first = run_backend(backend, case, dtype)
    second = run_backend(backend, case, dtype)
    for a, b, what in ((first[0], second[0], "y"), (first[2]["indices"], second[2]["indices"], "indices")):
        assert np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True), f"{what} differs between identical calls"
    for name in first[1]:
        assert np.array_equal(first[1][name], second[1][name]), f"new_state[{name!r}] differs between identical calls"
