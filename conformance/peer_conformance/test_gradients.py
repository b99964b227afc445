"""SPEC §7 Gradients: every trainable parameter and x, training and evaluation mode."""

import pytest
from hypothesis import given

from .helpers import check_gradients, needs
from .strategies import cases


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
@given(case=cases())
def test_gradients_match_reference(backend, dtype, case):
    needs(backend, "grad")
    needs(backend, dtype)
    check_gradients(backend, case, dtype)
