"""SPEC §9.2 Non-finite values: NaN in an input propagates to its own token only (evaluation
mode); NaN and ±Inf in a parameter route by SPEC §4.1 (NaN last) in every backend."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import peer_ref
from peer_ref import TOLERANCES, PEERConfig

from .helpers import assert_close, assert_equal, assert_tree_close, needs, run_backend, run_reference
from .strategies import SECONDARY, Case, cases, tied_cases


@SECONDARY
@given(case=cases(training=False, masked=False, lead=(5,)), token=st.integers(0, 4))
def test_nan_stays_in_its_token(backend, case, token):
    dtype = "float64" if "float64" in backend.capabilities else "float32"
    tol = TOLERANCES[dtype]
    x = case.x.copy()
    x[token, 0] = np.nan
    y_clean, _, _ = run_backend(backend, case, dtype)
    y, _, _ = run_backend(backend, case._replace(x=x), dtype)
    y, y_clean = np.asarray(y).astype(np.float64), np.asarray(y_clean).astype(np.float64)
    assert np.all(np.isnan(y[token])), f"y[{token}]={y[token].tolist()}, but should be all NaN [{case.describe()}]"
    others = [t for t in range(5) if t != token]
    assert_close(
        y[others], y_clean[others], rtol=tol.rtol, atol=tol.atol, what="y[other tokens]", context=case.describe()
    )


# Non-finite parameters (SPEC §9.2): their scores are ranked by SPEC §4.1, NaN below every number,
# so every backend selects the same experts as the reference and propagates the same non-finite
# values. Injected values: NaN and both infinities, into one entry of any parameter.
NONFINITE = [np.nan, np.inf, -np.inf]


def _paths(backend):
    """The default path, eager, and compiled where the backend has one."""
    return [None, False, True] if "jit" in backend.capabilities else [None, False]


def _inject(case, name, position, value):
    params = dict(case.params)
    table = params[name].copy()
    table.reshape(-1)[position % table.size] = value
    params[name] = table
    return case._replace(params=params)


def _check_same_as_reference(backend, case, dtype, jit, what):
    __tracebackhide__ = True
    tol = TOLERANCES[dtype]
    context = f"{what}, dtype={dtype}, jit={jit}, {case.describe()}"
    y, new_state, aux = run_backend(backend, case, dtype, jit=jit)
    y_ref, state_ref, aux_ref = run_reference(case, dtype)
    assert_equal(
        np.asarray(aux["indices"]).astype(np.int64), aux_ref["indices"], what="aux['indices']", context=context
    )
    assert_close(y, y_ref, rtol=tol.rtol, atol=tol.atol, what="y", context=context)
    assert_tree_close(new_state, state_ref, rtol=tol.rtol, atol=tol.atol, what="new_state", context=context)


@SECONDARY
@given(case=cases(), data=st.data())
def test_nonfinite_parameter_routes_like_the_reference(backend, case, data):
    """Any parameter, any path, training or evaluation, with or without mask: in float64 (exact
    routing) the experts chosen and the values propagated equal the reference's."""
    needs(backend, "float64")
    name = data.draw(st.sampled_from(sorted(case.cfg.param_shapes())), label="parameter")
    value = data.draw(st.sampled_from(NONFINITE), label="value")
    position = data.draw(st.integers(0, 2**16), label="position")
    jit = data.draw(st.sampled_from(_paths(backend)), label="jit")
    _check_same_as_reference(
        backend, _inject(case, name, position, value), "float64", jit, f"params[{name!r}] entry {position} = {value}"
    )


@SECONDARY
@given(case=tied_cases(), data=st.data())
def test_nonfinite_routing_parameter_is_exact_in_float32(backend, case, data):
    """Integer-valued queries and keys make every score exact in float32 too (as in test_routing),
    so a NaN or infinite sub-key or query weight must route exactly as the reference does."""
    name = data.draw(st.sampled_from(["query.kernel", "keys.left", "keys.right"]), label="parameter")
    value = data.draw(st.sampled_from(NONFINITE), label="value")
    position = data.draw(st.integers(0, 2**16), label="position")
    jit = data.draw(st.sampled_from(_paths(backend)), label="jit")
    _check_same_as_reference(
        backend, _inject(case, name, position, value), "float32", jit, f"params[{name!r}] entry {position} = {value}"
    )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("jit", [False, True])
def test_nan_sub_key_is_never_preferred(backend, dtype, jit):
    """A NaN left sub-key, the other one scoring 1: expert 0 (score 2), not the NaN experts 2, 3."""
    needs(backend, dtype)
    if jit:
        needs(backend, "jit")
    cfg = PEERConfig(d_model=2, n_experts=4, heads=1, topk=1, d_key=2, query_norm="none")
    params, state = peer_ref.init(cfg, seed=0)
    params["query.kernel"] = np.eye(2)
    params["keys.left"] = np.array([[[1.0], [np.nan]]])
    params["keys.right"] = np.array([[[1.0], [0.0]]])
    case = Case(cfg, params, state, np.array([[1.0, 1.0]]), None, np.ones((1, cfg.d_out)), False, 0)
    y, _, aux = run_backend(backend, case, dtype, jit=jit)
    assert_equal(
        np.asarray(aux["indices"]).astype(np.int64), [[[0]]], what="aux['indices']", context=f"dtype={dtype}, jit={jit}"
    )
    assert np.all(np.isfinite(np.asarray(y).astype(np.float64))), f"y={np.asarray(y).tolist()}, but should be finite"
    _check_same_as_reference(backend, case, dtype, jit, "NaN sub-key")
