"""SPEC §4 Order and ties: near-tie-aware routing, exact ties by index, routing override."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from peer_ref import TOLERANCES

from .helpers import assert_close, assert_equal, assert_valid_routing, needs, run_backend, run_reference
from .strategies import SECONDARY, cases, tied_cases


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
@given(case=tied_cases())
def test_exact_ties_go_to_the_lower_index(backend, dtype, case):
    needs(backend, dtype)
    _, _, aux = run_backend(backend, case, dtype)
    _, _, aux_ref = run_reference(case, dtype)
    assert_equal(
        np.asarray(aux["indices"]).astype(np.int64),
        aux_ref["indices"],
        what="aux['indices']",
        context=f"exact ties, dtype={dtype}, {case.describe()}",
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@given(case=cases())
def test_routing_is_a_valid_topk_of_reference_scores(backend, dtype, case):
    needs(backend, dtype)
    _, _, aux = run_backend(backend, case, dtype)
    assert_valid_routing(case, dtype, aux["indices"], f"dtype={dtype}, {case.describe()}")


@SECONDARY
@given(case=cases(), data=st.data())
def test_routing_override_uses_the_given_experts(backend, case, data):
    dtype = "float64" if "float64" in backend.capabilities else "float32"
    tol = TOLERANCES[dtype]
    cfg = case.cfg
    lead = case.x.shape[:-1]
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    routing = rng.integers(0, cfg.n_experts, lead + (cfg.heads, cfg.topk))
    y, state, aux = run_backend(backend, case, dtype, routing=routing)
    y_ref, state_ref, aux_ref = run_reference(case, dtype, routing=routing)
    context = f"routing override, {case.describe()}"
    assert_equal(np.asarray(aux["indices"]).astype(np.int64), routing, what="aux['indices']", context=context)
    assert_close(y, y_ref, rtol=tol.rtol, atol=tol.atol, what="y", context=context)
    assert_close(aux["scores"], aux_ref["scores"], rtol=tol.rtol, atol=tol.atol, what="aux['scores']", context=context)
