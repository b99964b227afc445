"""SPEC §10 Dtypes: what comes out in which dtype."""

import numpy as np
import pytest
from hypothesis import given

from peer_ref.checks import state_dtype

from .helpers import assert_dtype, needs, run_backend
from .strategies import SECONDARY, cases


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
@SECONDARY
@given(case=cases(lead=(5,)))
def test_output_dtypes(backend, dtype, case):
    needs(backend, dtype)
    y, state, aux = run_backend(backend, case, dtype)
    context = f"dtype={dtype}"
    assert_dtype(y, dtype, what="y", context=context)
    for name, value in state.items():
        assert_dtype(value, state_dtype(dtype), what=f"new_state[{name!r}]", context=context)
    kind = np.asarray(aux["indices"]).dtype.kind
    assert kind in "iu", f"aux['indices'].dtype={np.asarray(aux['indices']).dtype}, but should be an integer dtype"
    compute = "float32" if dtype == "bfloat16" else dtype
    for key in ("scores", "weights"):
        assert_dtype(aux[key], compute, what=f"aux[{key!r}]", context=context)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
@SECONDARY
@given(case=cases(lead=(5,)))
def test_gradient_dtypes(backend, dtype, case):
    needs(backend, dtype)
    needs(backend, "grad")
    grads, dx = run_backend(backend, case, dtype, dy=case.dy)
    assert set(grads) == set(case.cfg.param_shapes()), f"grads names={sorted(grads)}"
    for name, value in grads.items():
        assert_dtype(value, dtype, what=f"grads[{name!r}]", context=f"dtype={dtype}")
        assert np.shape(value) == case.cfg.param_shapes()[name], f"grads[{name!r}].shape={np.shape(value)}"
    assert_dtype(dx, dtype, what="dx", context=f"dtype={dtype}")
