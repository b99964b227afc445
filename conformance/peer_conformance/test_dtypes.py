"""SPEC §10 Dtypes: what comes out in which dtype."""

import numpy as np
import pytest
from hypothesis import given

from peer_ref.checks import state_dtype

from .helpers import MIXED, assert_dtype, needs, needs_mode, run_backend
from .strategies import STRUCTURE, cases

LOW = ("bfloat16", "float16")


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16", "float16"])
@STRUCTURE
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
    compute = "float32" if dtype in LOW else dtype
    for key in ("scores", "weights"):
        assert_dtype(aux[key], compute, what=f"aux[{key!r}]", context=context)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16", "float16"])
@STRUCTURE
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


@pytest.mark.parametrize(("dtype", "compute_dtype"), MIXED)
@STRUCTURE
@given(case=cases(lead=(5,)))
def test_mixed_dtypes(backend, dtype, compute_dtype, case):
    """SPEC §10.3: y and dx in compute_dtype; state, aux scores/weights and grads float32."""
    needs_mode(backend, dtype, compute_dtype)
    context = f"dtype={dtype}, compute_dtype={compute_dtype}"
    y, state, aux = run_backend(backend, case, dtype, compute_dtype=compute_dtype)
    assert_dtype(y, compute_dtype, what="y", context=context)
    for name, value in state.items():
        assert_dtype(value, "float32", what=f"new_state[{name!r}]", context=context)
    for key in ("scores", "weights"):
        assert_dtype(aux[key], "float32", what=f"aux[{key!r}]", context=context)
    if "grad" not in backend.capabilities:
        return
    grads, dx = run_backend(backend, case, dtype, dy=case.dy, compute_dtype=compute_dtype)
    for name, value in grads.items():
        assert_dtype(value, dtype, what=f"grads[{name!r}]", context=context)
    assert_dtype(dx, compute_dtype, what="dx", context=context)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16", "float16"])
@STRUCTURE
@given(case=cases(lead=(5,)))
def test_compute_dtype_equal_to_params_is_the_default(backend, dtype, case):
    """SPEC §10.3: compute_dtype equal to the parameters' dtype changes nothing, bit for bit."""
    needs(backend, dtype)
    needs(backend, "mixed")
    default = run_backend(backend, case, dtype)
    same = run_backend(backend, case, dtype, compute_dtype=dtype)
    assert np.array_equal(np.asarray(default[0]), np.asarray(same[0]), equal_nan=True), (
        f"y with compute_dtype={dtype!r} differs from y without it"
    )
    assert np.array_equal(default[2]["indices"], same[2]["indices"]), "aux['indices'] differ"
