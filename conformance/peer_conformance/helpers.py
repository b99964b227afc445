"""Assertion and conversion helpers of the conformance suite.

Every assertion fails with one message shape — ``what: detail [context]`` — and hides
its own frames so pytest points at the test.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import peer_ref
from peer_ref import TOLERANCES
from peer_ref.checks import state_dtype

from .strategies import require

# --- conversion ---------------------------------------------------------------------------


def np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


# The mixed modes of SPEC §10.3: (parameter dtype, compute_dtype).
MIXED = [("float32", "bfloat16"), ("float32", "float16")]


def needs_mode(backend, dtype: str, compute_dtype: str | None) -> None:
    """Skip unless the backend declares what the (dtype, compute_dtype) mode needs."""
    needs(backend, dtype)
    if compute_dtype is not None:
        needs(backend, "mixed")


def tolerance(dtype: str, compute_dtype: str | None = None):
    """The §10.2 row of a mode: the mixed modes use their compute dtype's row."""
    return TOLERANCES[compute_dtype or dtype]


def _mode(dtype: str, compute_dtype: str | None) -> str:
    return f"dtype={dtype}" + ("" if compute_dtype is None else f", compute_dtype={compute_dtype}")


def cast_tree(tree: dict, dtype: str) -> dict:
    return {k: np.asarray(v).astype(np_dtype(dtype)) for k, v in tree.items()}


def as_f64(value) -> Any:
    """Upcast a NumPy tree's floats to float64 for comparisons (exact for bf16/f32)."""
    if isinstance(value, dict):
        return {k: as_f64(v) for k, v in value.items()}
    arr = np.asarray(value)
    return arr.astype(np.float64) if arr.dtype.kind in "fV" or arr.dtype.name == "bfloat16" else arr


def dtype_name(arr) -> str:
    return np.asarray(arr).dtype.name


def prepare(backend):
    """Let a backend that computes float64 only once asked (JAX's x64 mode, say) switch it on."""
    if "float64" in backend.capabilities and hasattr(backend, "enable_float64"):
        backend.enable_float64()
    return backend


def with_implementation(backend, implementation: str):
    """The backend with ``implementation=`` passed by every apply and vjp call (unless the call
    passes its own); fails the run at once if the backend does not offer that implementation."""
    import functools
    import types

    offered = getattr(backend, "implementations", ())
    if implementation not in offered:
        pytest.fail(
            f"--peer-implementation {implementation!r}, but backend {backend.name!r} offers {list(offered)}",
            pytrace=False,
        )
    wrapped = types.SimpleNamespace(
        **{name: getattr(backend, name) for name in dir(backend) if not name.startswith("__")}
    )
    wrapped.apply = functools.partial(backend.apply, implementation=implementation)
    wrapped.vjp = functools.partial(backend.vjp, implementation=implementation)
    wrapped.implementation = implementation
    return wrapped


def needs(backend, capability: str) -> None:
    """Skip, as not supported, unless the backend declares ``capability``."""
    __tracebackhide__ = True
    if capability not in backend.capabilities:
        pytest.skip(f"not supported: capability {capability!r}")


def run_backend(backend, case, dtype: str, *, routing=None, jit=None, dy=None, compute_dtype=None, sparse=False):
    """Run the backend on ``case`` rounded to ``dtype``; returns NumPy results.

    ``jit`` None runs the backend's default path (what its users get); test_paths checks
    the eager and the compiled path explicitly. ``compute_dtype`` (a mixed mode, SPEC §10.3)
    rounds x and dy to it and passes it on; None passes nothing, as a caller that never
    heard of it would.

    Returns ``(y, new_state, aux)`` or, when ``dy`` is given, ``(grads, dx)``; ``sparse=True`` asks
    the vjp for row-sparse table gradients (SPEC §7.1; only then is ``sparse=`` passed).
    """
    require(mask=case.mask is not None, routing=routing is not None)
    params = backend.from_numpy(cast_tree(case.params, dtype))
    state = backend.from_numpy(cast_tree(case.state, state_dtype(dtype)))
    x = backend.from_numpy(case.x.astype(np_dtype(compute_dtype or dtype)))
    mask = None if case.mask is None else backend.from_numpy(case.mask)
    route = None if routing is None else backend.from_numpy(np.asarray(routing))
    extra = {} if compute_dtype is None else {"compute_dtype": compute_dtype}
    if dy is None:
        out = backend.apply(
            case.cfg, params, state, x, training=case.training, mask=mask, routing=route, jit=jit, **extra
        )
    else:
        d = backend.from_numpy(dy.astype(np_dtype(compute_dtype or dtype)))
        if sparse:
            extra["sparse"] = True
        out = backend.vjp(
            case.cfg, params, state, x, d, training=case.training, mask=mask, routing=route, jit=jit, **extra
        )
    return backend.to_numpy(out)


def reference_inputs(case, dtype: str, compute_dtype: str | None = None):
    """The case's inputs rounded to ``dtype`` then widened to float64: what the backend saw, exactly.

    In a mixed mode (``compute_dtype``, SPEC §10.3) the reference itself does the rounding it
    prescribes: params stay float32 and x is rounded to the compute dtype, both as the backend got them.
    """
    if compute_dtype is not None:
        return (
            cast_tree(case.params, dtype),
            cast_tree(case.state, state_dtype(dtype)),
            case.x.astype(np_dtype(compute_dtype)),
        )
    params = as_f64(cast_tree(case.params, dtype))
    state = as_f64(cast_tree(case.state, state_dtype(dtype)))
    x = as_f64(case.x.astype(np_dtype(dtype)))
    return params, state, x


def run_reference(case, dtype: str, *, routing=None, dy=None, compute_dtype=None):
    params, state, x = reference_inputs(case, dtype, compute_dtype)
    if compute_dtype is not None:
        if dy is None:
            return peer_ref.forward(
                case.cfg, params, state, x, case.training, case.mask, routing, compute_dtype=compute_dtype
            )
        return peer_ref.vjp(
            case.cfg,
            params,
            state,
            x,
            dy.astype(np_dtype(compute_dtype)),
            case.training,
            case.mask,
            routing,
            compute_dtype=compute_dtype,
        )
    if dy is None:
        return peer_ref.forward(case.cfg, params, state, x, case.training, case.mask, routing)
    dy64 = as_f64(dy.astype(np_dtype(dtype)))
    return peer_ref.vjp(case.cfg, params, state, x, dy64, case.training, case.mask, routing)


# --- assertions ---------------------------------------------------------------------------


def _ctx(context: str) -> str:
    return f" [{context}]" if context else ""


def _scale(expected: np.ndarray) -> float:
    finite = expected[np.isfinite(expected)] if expected.size else expected
    return max(1.0, float(np.max(np.abs(finite)))) if finite.size else 1.0


def assert_close(actual, expected, *, rtol: float, atol: float, what: str, context: str = "") -> None:
    """|actual - expected| <= atol * max(1, max|expected|) + rtol * |expected|, NaNs in the same places,
    infinities equal (same places, same signs)."""
    __tracebackhide__ = True
    a = as_f64(actual)
    e = as_f64(expected)
    if a.shape != e.shape:
        pytest.fail(f"{what}.shape={a.shape}, but should be {e.shape}{_ctx(context)}", pytrace=False)
    nan_a, nan_e = np.isnan(a), np.isnan(e)
    if not np.array_equal(nan_a, nan_e):
        pytest.fail(
            f"{what} has NaN at {np.argwhere(nan_a != nan_e)[:5].tolist()} where the reference "
            f"{'does not' if nan_a.any() else 'does'}{_ctx(context)}",
            pytrace=False,
        )
    a, e = np.where(nan_a, 0.0, a), np.where(nan_e, 0.0, e)
    # An infinity matches only itself (same sign): no tolerance reaches it, and inf - inf is NaN.
    bound = np.where(np.isinf(e), 0.0, atol * _scale(e) + rtol * np.abs(e))
    err = np.where(a == e, 0.0, np.abs(a - e))
    if not np.all(err <= bound):
        i = np.unravel_index(np.argmax(err - bound), err.shape)
        pytest.fail(
            f"{what}[{', '.join(map(str, i))}]={float(a[i])!r}, but should be {float(e[i])!r} "
            f"(|diff|={err[i]:.3g} > {bound[i]:.3g}; rtol={rtol}, atol={atol}){_ctx(context)}",
            pytrace=False,
        )


def assert_equal(actual, expected, *, what: str, context: str = "") -> None:
    __tracebackhide__ = True
    a, e = np.asarray(actual), np.asarray(expected)
    if a.shape != e.shape or not np.array_equal(a, e):
        pytest.fail(f"{what}={a.tolist()!r}, but should be {e.tolist()!r}{_ctx(context)}", pytrace=False)


def assert_dtype(arr, expected: str, *, what: str, context: str = "") -> None:
    __tracebackhide__ = True
    got = dtype_name(arr)
    if got != expected:
        pytest.fail(f"{what}.dtype={got}, but should be {expected}{_ctx(context)}", pytrace=False)


def assert_tree_close(actual: dict, expected: dict, *, rtol, atol, what: str, context: str = "") -> None:
    __tracebackhide__ = True
    if set(actual) != set(expected):
        pytest.fail(f"{what} names={sorted(actual)}, but should be {sorted(expected)}{_ctx(context)}", pytrace=False)
    for name in expected:
        assert_close(actual[name], expected[name], rtol=rtol, atol=atol, what=f"{what}[{name!r}]", context=context)


def assert_valid_routing(
    case, dtype: str, indices: np.ndarray, context: str = "", compute_dtype: str | None = None
) -> None:
    """Near-tie-aware routing check against the reference's float64 scores (SPEC §4.3).

    (a) the backend's experts are distinct and a valid top-k within the routing tolerance,
        listed in descending score order within it;
    (c) wherever the reference's ranking is separated by more than the tolerance (the k-th vs
        (k+1)-th expert and every adjacent pair within the top-k), the indices match exactly.
    """
    __tracebackhide__ = True
    cfg = case.cfg
    params, state, x = reference_inputs(case, dtype, compute_dtype)
    table = peer_ref.routing_scores(cfg, params, state, x, case.training, case.mask, compute_dtype=compute_dtype)
    table = np.asarray(table, dtype=np.float64)
    lead = table.shape[:-1]
    table = table.reshape(-1, cfg.n_experts)
    got = np.asarray(indices).astype(np.int64).reshape(-1, cfg.topk)
    if np.asarray(indices).shape != lead + (cfg.topk,):
        pytest.fail(
            f"aux['indices'].shape={np.shape(indices)}, but should be {lead + (cfg.topk,)}{_ctx(context)}",
            pytrace=False,
        )
    if got.size and (got.min() < 0 or got.max() >= cfg.n_experts):
        pytest.fail(f"aux['indices'] has values outside [0, {cfg.n_experts}){_ctx(context)}", pytrace=False)
    tol = tolerance(dtype, compute_dtype).route * _scale(table)
    expected = np.lexsort((np.broadcast_to(np.arange(cfg.n_experts), table.shape), -table), axis=-1)
    best = np.take_along_axis(table, expected, axis=-1)
    chosen = np.take_along_axis(table, got, axis=-1)
    for row in range(got.shape[0]):
        where = f"token-head {np.unravel_index(row, lead) if lead else row}"
        if len(set(got[row].tolist())) != cfg.topk:
            pytest.fail(f"aux['indices'][{where}]={got[row].tolist()} repeats an expert{_ctx(context)}", pytrace=False)
        if np.any(np.sort(chosen[row])[::-1] < best[row, : cfg.topk] - tol):
            pytest.fail(
                f"aux['indices'][{where}]={got[row].tolist()} with reference scores {chosen[row].tolist()}, "
                f"but should be a top-{cfg.topk} within {tol:.3g} of {expected[row, : cfg.topk].tolist()} "
                f"(scores {best[row, : cfg.topk].tolist()}){_ctx(context)}",
                pytrace=False,
            )
        if np.any(np.diff(chosen[row]) > tol):
            pytest.fail(
                f"aux['indices'][{where}]={got[row].tolist()} has reference scores {chosen[row].tolist()}, "
                f"but should be in descending score order{_ctx(context)}",
                pytrace=False,
            )
        ranked = best[row, : cfg.topk + 1]
        if np.all(-np.diff(ranked) > tol):
            assert_equal(
                got[row],
                expected[row, : cfg.topk],
                what=f"aux['indices'][{where}]",
                context=f"reference ranking separated by > {tol:.3g}; {context}",
            )


# --- whole-call checks used by several modules ---------------------------------------------


def check_forward(backend, case, dtype: str, *, jit=None, compute_dtype=None) -> None:
    """Forward of the backend equals the reference run with the backend's own routing (SPEC §3, §4.3)."""
    __tracebackhide__ = True
    tol = tolerance(dtype, compute_dtype)
    context = f"{_mode(dtype, compute_dtype)}, jit={jit}, {case.describe()}"
    y, new_state, aux = run_backend(backend, case, dtype, jit=jit, compute_dtype=compute_dtype)
    assert_valid_routing(case, dtype, aux["indices"], context, compute_dtype=compute_dtype)
    routing = np.asarray(aux["indices"]).astype(np.int64)
    y_ref, state_ref, aux_ref = run_reference(case, dtype, routing=routing, compute_dtype=compute_dtype)
    assert_close(y, y_ref, rtol=tol.rtol, atol=tol.atol, what="y", context=context)
    assert_tree_close(new_state, state_ref, rtol=tol.rtol, atol=tol.atol, what="new_state", context=context)
    for key in ("scores", "weights"):
        assert_close(aux[key], aux_ref[key], rtol=tol.rtol, atol=tol.atol, what=f"aux[{key!r}]", context=context)


def check_gradients(backend, case, dtype: str, *, jit=None, compute_dtype=None) -> None:
    """vjp of the backend equals the reference's analytic vjp under the backend's routing (SPEC §7)."""
    __tracebackhide__ = True
    tol = tolerance(dtype, compute_dtype)
    context = f"{_mode(dtype, compute_dtype)}, jit={jit}, {case.describe()}"
    _, _, aux = run_backend(backend, case, dtype, jit=jit, compute_dtype=compute_dtype)
    routing = np.asarray(aux["indices"]).astype(np.int64)
    grads, dx = run_backend(backend, case, dtype, jit=jit, dy=case.dy, compute_dtype=compute_dtype)
    grads_ref, dx_ref = run_reference(case, dtype, routing=routing, dy=case.dy, compute_dtype=compute_dtype)
    assert_tree_close(grads, grads_ref, rtol=tol.grad_rtol, atol=tol.grad_atol, what="grads", context=context)
    assert_close(dx, dx_ref, rtol=tol.grad_rtol, atol=tol.grad_atol, what="dx", context=context)
