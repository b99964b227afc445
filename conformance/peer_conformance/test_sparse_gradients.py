"""SPEC §7.1 Row-sparse table gradients: ``vjp(..., sparse=True)`` lists the experts selected by
valid tokens, sorted and unique, with the dense gradient's rows there (every backend that declares
the "sparse_grad" capability). The values are the dense gradient's, which test_gradients checks on
many more draws; a wrong row list shows on any draw of its config, so these tests take few."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import peer_ref

from .helpers import (
    MIXED,
    assert_close,
    assert_dtype,
    assert_equal,
    dtype_name,
    needs,
    needs_mode,
    run_backend,
    run_reference,
    tolerance,
)
from .strategies import STRUCTURE, cases, require

SECTION = "§7.1 Row-sparse gradients"


def check_sparse_gradients(backend, case, dtype: str, *, compute_dtype=None, routing=None) -> None:
    """The backend's row-sparse gradients against its own dense ones and the reference's (SPEC §7.1).

    ``routing`` None: the backend routes, and the rows follow its own selection."""
    __tracebackhide__ = True
    needs(backend, "grad")
    needs(backend, "sparse_grad")
    tol = tolerance(dtype, compute_dtype)
    context = f"{dtype}, compute_dtype={compute_dtype}, routing override={routing is not None}, {case.describe()}"
    if routing is None:
        _, _, aux = run_backend(backend, case, dtype, compute_dtype=compute_dtype)
        selected = np.asarray(aux["indices"]).astype(np.int64)
    else:
        selected = routing
    kwargs = dict(routing=routing, dy=case.dy, compute_dtype=compute_dtype)
    dense, dx_dense = run_backend(backend, case, dtype, **kwargs)
    sparse, dx_sparse = run_backend(backend, case, dtype, sparse=True, **kwargs)
    ref, dx_ref = run_reference(case, dtype, routing=selected, dy=case.dy, compute_dtype=compute_dtype)
    valid = np.ones(case.x.shape[:-1], bool) if case.mask is None else case.mask
    rows = peer_ref.gradient_rows(selected.reshape(valid.shape + selected.shape[-2:]), valid)
    if set(sparse) != set(dense):
        pytest.fail(f"sparse grads names={sorted(sparse)}, but should be {sorted(dense)} [{context}]", pytrace=False)
    close = dict(rtol=tol.grad_rtol, atol=tol.grad_atol, context=context)
    for name, value in sparse.items():
        if name not in peer_ref.EXPERT_TABLES:
            assert_close(value, dense[name], what=f"sparse=True grads[{name!r}] (dense)", **close)
            continue
        if not isinstance(value, peer_ref.RowSparse):
            pytest.fail(
                f"grads[{name!r}] is {type(value).__name__}, but should be row-sparse "
                f"(to_numpy gives peer_ref.RowSparse) [{context}]",
                pytrace=False,
            )
        what = f"grads[{name!r}]"
        assert_equal(np.asarray(value.rows).astype(np.int64), rows, what=f"{what}.rows", context=context)
        if np.asarray(value.rows).dtype.kind not in "iu":
            pytest.fail(f"{what}.rows.dtype={dtype_name(value.rows)}, but should be an integer dtype", pytrace=False)
        assert_dtype(value.values, dtype_name(dense[name]), what=f"{what}.values", context=context)
        n_rows = dense[name].shape[0]
        assert_close(value.values, ref[name][rows], what=f"{what}.values", **close)
        assert_close(
            peer_ref.RowSparse(rows, value.values).densify(n_rows), dense[name], what=f"{what} densified", **close
        )
        unlisted = np.ones(n_rows, bool)
        unlisted[rows] = False
        if np.any(np.asarray(dense[name])[unlisted] != 0):
            pytest.fail(f"dense {what} is nonzero on a row no valid token selected [{context}]", pytrace=False)
    assert_close(dx_sparse, dx_ref, what="dx (sparse=True)", **close)
    assert_close(dx_sparse, dx_dense, what="dx (sparse=True vs sparse=False)", **close)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@STRUCTURE
@given(case=cases())
def test_sparse_gradients_match_dense(backend, dtype, case):
    """Every config (GLU, expert bias, masks, shared or per-head keys), training and evaluation."""
    needs(backend, dtype)
    check_sparse_gradients(backend, case, dtype)


@STRUCTURE
@given(case=cases(), data=st.data())
def test_sparse_gradients_routing_override(backend, case, data):
    """A routing override lists its experts (repeats once, SPEC §4.4)."""
    require(routing=True)
    cfg = case.cfg
    lead = case.x.shape[:-1]
    rng = np.random.default_rng(case.seed)
    # Few distinct experts, so that repeats (within a token and across tokens) are common.
    pool = rng.integers(0, cfg.n_experts, size=data.draw(st.integers(1, 3)))
    routing = rng.choice(pool, size=lead + (cfg.heads, cfg.topk)).astype(np.int64)
    check_sparse_gradients(backend, case, "float32", routing=routing)


@pytest.mark.parametrize(("dtype", "compute_dtype"), MIXED)
@STRUCTURE
@given(case=cases())
def test_sparse_gradients_mixed(backend, dtype, compute_dtype, case):
    """The mixed mode (SPEC §10.3): float32 values, the dense gradient's rows."""
    needs_mode(backend, dtype, compute_dtype)
    check_sparse_gradients(backend, case, dtype, compute_dtype=compute_dtype)


@given(case=cases(lead=(0,)))
@STRUCTURE
def test_sparse_gradients_no_tokens(backend, case):
    """Zero tokens (SPEC §6): every table lists no row."""
    check_sparse_gradients(backend, case, "float32")
