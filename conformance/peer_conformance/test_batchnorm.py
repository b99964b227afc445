"""SPEC §3.3 Query batch norm: batch vs running statistics, the running update, masks, empty batches."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from peer_ref import TOLERANCES

from .helpers import assert_close, assert_equal, assert_tree_close, run_backend, run_reference
from .strategies import SECONDARY, cases


def _dtype(backend):
    return "float64" if "float64" in backend.capabilities else "float32"


@SECONDARY
@given(case=cases(query_norm="batch", training=True))
def test_training_updates_running_statistics(backend, case):
    dtype = _dtype(backend)
    tol = TOLERANCES[dtype]
    _, state, aux = run_backend(backend, case, dtype)
    _, state_ref, _ = run_reference(case, dtype, routing=np.asarray(aux["indices"]).astype(np.int64))
    assert_tree_close(state, state_ref, rtol=tol.rtol, atol=tol.atol, what="new_state", context=case.describe())


@SECONDARY
@given(case=cases(query_norm="batch", training=False))
def test_evaluation_leaves_state_unchanged(backend, case):
    _, state, _ = run_backend(backend, case, _dtype(backend))
    for name, value in case.state.items():
        assert_equal(
            np.asarray(state[name]).astype(np.float64),
            value.astype(_dtype(backend)).astype(np.float64),
            what=f"new_state[{name!r}]",
            context=f"evaluation, {case.describe()}",
        )


@SECONDARY
@given(case=cases(training=False, masked=False, lead=(5,)), perm_seed=st.integers(0, 2**31))
def test_evaluation_is_per_token(backend, case, perm_seed):
    """With running statistics, permuting tokens permutes outputs (no cross-token coupling)."""
    dtype = _dtype(backend)
    tol = TOLERANCES[dtype]
    perm = np.random.default_rng(perm_seed).permutation(5)
    y, _, _ = run_backend(backend, case, dtype)
    y_perm, _, _ = run_backend(backend, case._replace(x=case.x[perm]), dtype)
    assert_close(y_perm, np.asarray(y)[perm], rtol=tol.rtol, atol=tol.atol, what="y[perm]", context=case.describe())


@SECONDARY
@given(case=cases(query_norm="batch", training=True, masked=True))
def test_masked_tokens_do_not_change_statistics(backend, case):
    dtype = _dtype(backend)
    tol = TOLERANCES[dtype]
    _, state, _ = run_backend(backend, case, dtype)
    noisy = np.where(case.mask[..., None], case.x, 100.0 * case.x + 7.0)
    _, state_noisy, _ = run_backend(backend, case._replace(x=noisy), dtype)
    assert_tree_close(state_noisy, state, rtol=tol.rtol, atol=tol.atol, what="new_state", context=case.describe())


@SECONDARY
@given(case=cases(query_norm="batch", training=True, lead=(0,)))
def test_training_on_zero_tokens_leaves_state_unchanged(backend, case):
    y, state, _ = run_backend(backend, case, _dtype(backend))
    assert np.shape(y) == (0, case.cfg.d_out)
    for name, value in case.state.items():
        assert_equal(
            np.asarray(state[name]).astype(np.float64),
            value.astype(_dtype(backend)).astype(np.float64),
            what=f"new_state[{name!r}]",
            context="zero tokens",
        )


@SECONDARY
@given(case=cases(query_norm="batch", training=True, masked=True, lead=(5,)))
def test_training_with_every_token_masked_leaves_state_unchanged(backend, case):
    case = case._replace(mask=np.zeros(5, bool))
    y, state, _ = run_backend(backend, case, _dtype(backend))
    assert_equal(np.asarray(y).astype(np.float64), np.zeros((5, case.cfg.d_out)), what="y", context="all masked")
    for name, value in case.state.items():
        assert_equal(
            np.asarray(state[name]).astype(np.float64),
            value.astype(_dtype(backend)).astype(np.float64),
            what=f"new_state[{name!r}]",
            context="all masked",
        )


@SECONDARY
@given(case=cases(query_norm="none"))
def test_no_query_norm_has_no_state(backend, case):
    _, state, _ = run_backend(backend, case._replace(state={}), _dtype(backend))
    assert dict(state) == {}, f"new_state={sorted(state)}, but should be empty when query_norm='none'"
