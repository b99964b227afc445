"""SPEC §6 Shapes: any number of leading dims, zero tokens, aux shapes."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from peer_ref import TOLERANCES

from .helpers import assert_close, assert_equal, run_backend
from .strategies import SECONDARY, cases


def _dtype(backend):
    return "float64" if "float64" in backend.capabilities else "float32"


@SECONDARY
@given(case=st.sampled_from([(), (0,), (1,), (2, 3), (2, 0)]).flatmap(lambda lead: cases(lead=lead)))
def test_output_and_aux_shapes(backend, case):
    cfg, lead = case.cfg, case.x.shape[:-1]
    y, _, aux = run_backend(backend, case, _dtype(backend))
    assert np.shape(y) == lead + (cfg.d_out,), f"y.shape={np.shape(y)}, but should be {lead + (cfg.d_out,)}"
    for key in ("indices", "scores", "weights"):
        want = lead + (cfg.heads, cfg.topk)
        assert np.shape(aux[key]) == want, f"aux[{key!r}].shape={np.shape(aux[key])}, but should be {want}"


@SECONDARY
@given(case=cases(lead=(2, 3)))
def test_leading_dims_are_flattened_token_order(backend, case):
    dtype = _dtype(backend)
    tol = TOLERANCES[dtype]
    y, state, aux = run_backend(backend, case, dtype)
    flat = case._replace(x=case.x.reshape(6, -1), mask=None if case.mask is None else case.mask.reshape(6))
    y_flat, state_flat, aux_flat = run_backend(backend, flat, dtype)
    assert_close(np.asarray(y).reshape(6, -1), y_flat, rtol=tol.rtol, atol=tol.atol, what="y", context=case.describe())
    assert_equal(
        np.asarray(aux["indices"]).reshape(6, case.cfg.heads, -1),
        aux_flat["indices"],
        what="aux['indices']",
        context=case.describe(),
    )


@SECONDARY
@given(case=cases(lead=(0,)))
def test_zero_tokens(backend, case):
    y, _, aux = run_backend(backend, case, _dtype(backend))
    assert np.shape(y) == (0, case.cfg.d_out)
    assert np.shape(aux["indices"]) == (0, case.cfg.heads, case.cfg.topk)
