"""Argument validation shared by the reference and every backend (SPEC §9).

Everything here works on shapes and dtype *names* ("float32", "int64", "bool"),
so a backend calls the same functions on its own tensors and raises the very
same errors. Nothing is silently cast, broadcast or truncated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from .config import DTYPES, LOW_DTYPES, PEERConfig
from .errors import PEERInputError

Meta = tuple[tuple[int, ...], str]  # (shape, dtype name)


class Arguments(NamedTuple):
    """What :func:`check_arguments` learns from a valid call."""

    lead: tuple[int, ...]  # x.shape[:-1], the token shape
    dtype: str  # the parameters' dtype name
    low: str | None  # the mixed mode's low dtype name (SPEC §10.3), or None


def state_dtype(param_dtype: str) -> str:
    """Batch-norm statistics are kept in float32 when parameters are bfloat16 or float16 (SPEC §10.1)."""
    return "float32" if param_dtype in LOW_DTYPES else param_dtype


def check_flag(name: str, value: object) -> bool:
    """A boolean argument ``name`` (``sparse=``, ...): raises PEERInputError unless it is a bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise PEERInputError(f"{name}={value!r}, but expected a bool")
    return bool(value)


def check_compute_dtype(param_dtype: str, compute_dtype: object) -> str | None:
    """Validate ``compute_dtype=`` against the parameters' dtype (SPEC §10.3).

    Returns the low dtype name of the mixed mode ("bfloat16" or "float16" with float32
    parameters), or None for the default mode (``compute_dtype`` None or the parameters' dtype).
    """
    if compute_dtype is None:
        return None
    if not isinstance(compute_dtype, str) or compute_dtype not in DTYPES:
        raise PEERInputError(f"compute_dtype={compute_dtype!r}, but expected None or one of {DTYPES}")
    if compute_dtype == param_dtype:
        return None
    if param_dtype == "float32" and compute_dtype in LOW_DTYPES:
        return compute_dtype
    raise PEERInputError(
        f"compute_dtype={compute_dtype!r} with {param_dtype} parameters, but expected None, "
        f"{param_dtype!r} (the parameters' dtype), or one of {LOW_DTYPES} with float32 parameters "
        "(mixed precision)"
    )


def check_tree(cfg: PEERConfig, kind: str, tree: Mapping[str, Meta], dtype: str | None = None) -> str:
    """Check names, shapes and a common float dtype of ``params`` or ``state``.

    Returns the common dtype name. ``dtype`` (if given) is the dtype the tree must have.
    """
    expected = cfg.param_shapes() if kind == "params" else cfg.state_shapes()
    missing = sorted(set(expected) - set(tree))
    extra = sorted(set(tree) - set(expected))
    if missing or extra:
        raise PEERInputError(
            f"{kind} has names missing={missing} extra={extra}, but expected exactly {sorted(expected)} for this config"
        )
    found = dtype
    for name in expected:
        shape, dt = tree[name]
        if tuple(shape) != expected[name]:
            raise PEERInputError(f"{kind}[{name!r}].shape={tuple(shape)}, but expected {expected[name]}")
        if dt not in DTYPES:
            raise PEERInputError(f"{kind}[{name!r}].dtype={dt}, but expected one of {DTYPES}")
        if found is None:
            found = dt
        elif dt != found:
            raise PEERInputError(f"{kind}[{name!r}].dtype={dt}, but expected {found} like the rest of {kind}")
    return found or "float64"


def check_params_state(cfg: PEERConfig, params: Mapping[str, Meta], state: Mapping[str, Meta]) -> str:
    """Validate params and state together; returns the parameter dtype name."""
    dtype = check_tree(cfg, "params", params)
    if cfg.state_shapes():
        check_tree(cfg, "state", state, dtype=state_dtype(dtype))
    elif state:
        raise PEERInputError(f"state has names {sorted(state)}, but expected none when query_norm='none'")
    return dtype


def check_call(
    cfg: PEERConfig,
    param_dtype: str,
    x: Meta,
    training: object,
    mask: Meta | None = None,
    routing: Meta | None = None,
    dy: Meta | None = None,
    compute_dtype: str | None = None,
) -> tuple[int, ...]:
    """Validate the arguments of forward/vjp; returns the leading (token) shape of x.

    ``compute_dtype`` is the low dtype returned by :func:`check_compute_dtype` (or None): in the
    mixed mode x and dy must have it instead of the parameters' dtype.
    """
    if not isinstance(training, (bool, np.bool_)):
        raise PEERInputError(f"training={training!r}, but expected a bool")
    x_shape, x_dtype = tuple(x[0]), x[1]
    if len(x_shape) < 1:
        raise PEERInputError(f"x.shape={x_shape}, but expected (..., d_model={cfg.d_model})")
    if x_shape[-1] != cfg.d_model:
        raise PEERInputError(f"x.shape={x_shape}, but expected a last dimension of d_model={cfg.d_model}")
    if compute_dtype is None and x_dtype != param_dtype:
        raise PEERInputError(
            f"x.dtype={x_dtype}, but expected {param_dtype} (the parameters' dtype; "
            "nothing is cast implicitly; pass compute_dtype= for mixed precision)"
        )
    if compute_dtype is not None and x_dtype != compute_dtype:
        raise PEERInputError(
            f"x.dtype={x_dtype}, but expected {compute_dtype} (compute_dtype={compute_dtype!r} with "
            f"{param_dtype} parameters; nothing is cast implicitly)"
        )
    lead = x_shape[:-1]
    if mask is not None:
        m_shape, m_dtype = tuple(mask[0]), mask[1]
        if m_dtype != "bool":
            raise PEERInputError(f"mask.dtype={m_dtype}, but expected bool")
        if m_shape != lead:
            raise PEERInputError(f"mask.shape={m_shape}, but expected x.shape[:-1]={lead}")
    if routing is not None:
        r_shape, r_dtype = tuple(routing[0]), routing[1]
        if not (r_dtype.startswith("int") or r_dtype.startswith("uint")):
            raise PEERInputError(f"routing.dtype={r_dtype}, but expected an integer dtype")
        want = lead + (cfg.heads, cfg.topk)
        if r_shape != want:
            raise PEERInputError(f"routing.shape={r_shape}, but expected x.shape[:-1] + (heads, topk)={want}")
    if dy is not None:
        d_shape, d_dtype = tuple(dy[0]), dy[1]
        want = lead + (cfg.d_out,)
        if d_shape != want:
            raise PEERInputError(f"dy.shape={d_shape}, but expected x.shape[:-1] + (d_out,)={want}")
        want_dtype = compute_dtype or param_dtype
        if d_dtype != want_dtype:
            raise PEERInputError(f"dy.dtype={d_dtype}, but expected {want_dtype} (like x)")
    return lead


def check_routing_values(cfg: PEERConfig, low: int, high: int) -> None:
    """Routing indices must lie in [0, n_experts); call with the min and max of a non-empty routing."""
    check_expert_indices(cfg.n_experts, low, high)


def check_expert_indices(n_experts: int, low: int, high: int) -> None:
    """``check_routing_values`` given the expert count alone (where a compiled graph checks the
    values, with the config's ints as its constants)."""
    if low < 0 or high >= n_experts:
        bad = low if low < 0 else high
        raise PEERInputError(f"routing contains {bad}, but expected expert indices in [0, n_experts={n_experts})")


def check_dtype_name(dtype: str, allowed: Sequence[str] = DTYPES) -> str:
    if dtype not in allowed:
        raise PEERInputError(f"dtype={dtype!r}, but expected one of {tuple(allowed)}")
    return dtype


def check_trees(cfg: PEERConfig, params: object, state: object, meta: Callable[[Any], Meta]) -> str:
    """``params`` and ``state`` as dicts of arrays with the config's names, shapes and one dtype
    (SPEC §9); ``meta`` reads (shape, dtype name) of one of the backend's arrays. Returns the
    parameters' dtype name. Raises PEERInputError."""
    for arg, value in (("params", params), ("state", state)):
        if not isinstance(value, dict):
            raise PEERInputError(f"{arg} is {type(value).__name__}, but expected a dict of arrays")
    return check_params_state(cfg, {k: meta(v) for k, v in params.items()}, {k: meta(v) for k, v in state.items()})


def check_arguments(
    cfg: PEERConfig,
    params: object,
    state: object,
    x: Any,
    training: object,
    mask: Any = None,
    routing: Any = None,
    dy: Any = None,
    compute_dtype: object = None,
    *,
    meta: Callable[[Any], Meta],
    routing_range: Callable[[Any], tuple[int, int] | None],
) -> Arguments:
    """Every check of an apply or vjp call (SPEC §9), in the one order every backend follows.

    ``meta`` reads (shape, dtype name) of one of the backend's arrays; ``routing_range`` reads
    (min, max) of a non-empty routing array, or returns None where its values cannot be read
    yet (a traced or compiled call, which checks them where they are known). ``compute_dtype`` is a
    dtype name or None (a backend converts its own dtype objects to names first).
    Raises PEERInputError naming the argument, the value and what was expected.
    """
    dtype = check_trees(cfg, params, state, meta)
    low = check_compute_dtype(dtype, compute_dtype)
    optional = [None if value is None else meta(value) for value in (mask, routing, dy)]
    lead = check_call(cfg, dtype, meta(x), training, *optional, compute_dtype=low)
    if routing is not None and 0 not in tuple(optional[1][0]):
        bounds = routing_range(routing)
        if bounds is not None:
            check_routing_values(cfg, *bounds)
    return Arguments(lead, dtype, low)
