"""SPEC §7 Gradients: every trainable parameter and x, training and evaluation mode."""

import pytest
from hypothesis import given

from .helpers import MIXED, check_gradients, needs, needs_mode
from .strategies import SECONDARY, cases

SECTION = "§7 Gradients"


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
@given(case=cases())
def test_gradients_match_reference(backend, dtype, case):
    needs(backend, "grad")
    needs(backend, dtype)
    check_gradients(backend, case, dtype)


@pytest.mark.parametrize(("dtype", "compute_dtype"), [("float16", None)] + MIXED)
@SECONDARY
@given(case=cases())
def test_gradients_match_reference_low_precision(backend, dtype, compute_dtype, case):
    """float16 parameters (SPEC §10.1) and the mixed modes: rounding is straight-through (SPEC §10.3)."""
    needs(backend, "grad")
    needs_mode(backend, dtype, compute_dtype)
    check_gradients(backend, case, dtype, compute_dtype=compute_dtype)
