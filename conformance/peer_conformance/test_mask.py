"""SPEC §5 Masks: masked tokens output exactly zero and receive zero gradient."""

import numpy as np
from hypothesis import given

from peer_ref import TOLERANCES

from .helpers import assert_close, assert_equal, needs, run_backend
from .strategies import SECONDARY, cases


def _dtype(backend):
    return "float64" if "float64" in backend.capabilities else "float32"


@SECONDARY
@given(case=cases(masked=True))
def test_masked_tokens_output_exactly_zero_even_if_nan(backend, case):
    x = np.where(case.mask[..., None], case.x, np.nan)
    y, _, _ = run_backend(backend, case._replace(x=x), _dtype(backend))
    y = np.asarray(y).astype(np.float64)
    assert_equal(y[~case.mask], np.zeros_like(y[~case.mask]), what="y[masked]", context=case.describe())


@SECONDARY
@given(case=cases(masked=True))
def test_masked_tokens_do_not_change_other_outputs(backend, case):
    dtype = _dtype(backend)
    tol = TOLERANCES[dtype]
    y, _, _ = run_backend(backend, case, dtype)
    noisy = np.where(case.mask[..., None], case.x, -3.0 * case.x + 1.0)
    y_noisy, _, _ = run_backend(backend, case._replace(x=noisy), dtype)
    assert_close(y_noisy, y, rtol=tol.rtol, atol=tol.atol, what="y", context=case.describe())


@SECONDARY
@given(case=cases(masked=True))
def test_masked_tokens_get_zero_input_gradient(backend, case):
    needs(backend, "grad")
    _, dx = run_backend(backend, case, _dtype(backend), dy=case.dy)
    dx = np.asarray(dx).astype(np.float64)
    assert_equal(dx[~case.mask], np.zeros_like(dx[~case.mask]), what="dx[masked]", context=case.describe())


@SECONDARY
@given(case=cases(masked=True))
def test_nan_in_masked_tokens_leaves_gradients_finite(backend, case):
    needs(backend, "grad")
    x = np.where(case.mask[..., None], case.x, np.nan)
    grads, dx = run_backend(backend, case._replace(x=x), _dtype(backend), dy=case.dy)
    for name, value in {**grads, "dx": dx}.items():
        value = np.asarray(value).astype(np.float64)
        assert np.all(np.isfinite(value)), (
            f"{name} has non-finite entries though only masked tokens hold NaN [{case.describe()}]"
        )
