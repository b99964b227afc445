"""The PEER forward pass, step by step (SPEC §3). Vectorised over tokens."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import checks
from .config import PEERConfig
from .errors import PEERInputError
from .functions import activation, score_weights
from .routing import expert_scores, product_key_topk, sub_key_scores


class Tape(NamedTuple):
    """Intermediates of one forward call, kept for the analytic backward."""

    lead: tuple
    x: np.ndarray  # (T, d_model)
    valid: np.ndarray  # (T,) bool
    normed: np.ndarray | None  # (T, d_query) standardised query before scale/offset
    inv_std: np.ndarray | None  # (d_query,)
    batch_stats: bool  # normalised with this call's statistics (gradient flows through them)
    n_valid: int
    queries: np.ndarray  # (T, heads, d_key) after query norm
    indices: np.ndarray  # (T, heads, topk)
    weights: np.ndarray  # (T, heads, topk)
    pre: np.ndarray  # (T, heads, topk) expert pre-activations
    gate: np.ndarray | None  # (T, heads, topk) linear gate values g_i . x; None without expert_glu
    params: dict  # the parameter values read (rounded ones in the mixed mode, SPEC §10.3)
    low: str | None  # the mixed mode's low dtype, or None


def validate(
    cfg, params, state, x, training, mask=None, routing=None, dy=None, compute_dtype=None
) -> tuple[tuple[int, ...], str | None]:
    """Check every argument (SPEC §9); returns the leading shape of x and the mixed mode's
    low dtype (None outside the mixed mode, SPEC §10.3)."""
    # The reference runs on NumPy arrays only (checked after the trees, as each backend checks
    # its own array type), then every rule of SPEC §9 in check_arguments' order, so that a bad
    # argument gets the same message here as in every backend (float16 parameters with a
    # float32 x: x's dtype); only a call valid for the backends meets the reference's own limit,
    # float64 and float32 parameters.
    checks.check_trees(cfg, params, state, meta)
    if not isinstance(x, np.ndarray):
        raise PEERInputError(f"x is {type(x).__name__}, but expected a numpy.ndarray")
    lead, dtype, low = checks.check_arguments(
        cfg,
        params,
        state,
        x,
        training,
        mask,
        routing,
        dy,
        compute_dtype,
        meta=meta,
        routing_range=lambda r: (int(np.min(r)), int(np.max(r))),
    )
    checks.check_dtype_name(dtype, ("float64", "float32"))
    return lead, low


def meta(value) -> checks.Meta:
    """(shape, dtype name) of an array, as peer_ref.checks reads it."""
    return np.shape(value), _dtype_name(value)


def low_numpy_dtype(name: str) -> np.dtype:
    """NumPy dtype of a low dtype name; bfloat16 is ml_dtypes' (imported only when asked)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


# Parameters read in the low dtype in the mixed mode (SPEC §10.3): the query projection and the
# expert rows. Everything else (biases, batch-norm affine, sub-keys) is read in float32.
ROUNDED_PARAMS = ("query.kernel", "experts.down", "experts.gate", "experts.up")


def read_params(params: dict, low: str | None) -> dict:
    """The parameter values the computation reads: in the mixed mode the ROUNDED_PARAMS rounded
    to nearest-even in the low dtype and widened back (exact), the rest unchanged (SPEC §10.3).
    Rounding a whole table equals rounding each row as it is gathered."""
    if low is None:
        return params
    dt = low_numpy_dtype(low)
    with np.errstate(over="ignore"):  # a float32 value beyond float16's range reads as ±inf
        return {
            name: value.astype(dt).astype(value.dtype) if name in ROUNDED_PARAMS else value
            for name, value in params.items()
        }


def _dtype_name(value) -> str:
    return np.asarray(value).dtype.name


def query_norm(cfg: PEERConfig, params, state, q, valid, training):
    """Batch norm of the queries (SPEC §3.3). Returns (normed query, new state, tape parts)."""
    if cfg.query_norm == "none":
        return q, dict(state), (None, None, False, 0)
    n_valid = int(valid.sum())
    use_batch = training and n_valid > 0
    if use_batch:
        mean = q[valid].sum(axis=0) / n_valid
        var = ((q[valid] - mean) ** 2).sum(axis=0) / n_valid
        m = cfg.bn_momentum
        unbiased = var * (n_valid / max(n_valid - 1, 1))
        s_dtype = state["query_norm.mean"].dtype
        new_state = {
            "query_norm.mean": ((1 - m) * state["query_norm.mean"] + m * mean).astype(s_dtype),
            "query_norm.var": ((1 - m) * state["query_norm.var"] + m * unbiased).astype(s_dtype),
        }
    else:
        # Evaluation, or a training call with no valid token: running statistics, state unchanged.
        mean = state["query_norm.mean"].astype(q.dtype)
        var = state["query_norm.var"].astype(q.dtype)
        new_state = dict(state)
    inv_std = 1.0 / np.sqrt(var + q.dtype.type(cfg.bn_eps))
    normed = (q - mean) * inv_std
    out = normed * params["query_norm.scale"] + params["query_norm.offset"]
    return out, new_state, (normed, inv_std, use_batch, n_valid)


def expert_gate(cfg: PEERConfig, params, xf: np.ndarray, indices: np.ndarray) -> np.ndarray | None:
    """§3.10 GLU experts: the linear gate g_i . x of each selected expert, or None without expert_glu."""
    if not cfg.expert_glu:
        return None
    return np.einsum("td,thkd->thk", xf, params["experts.gate"][indices])


def zero_masked(rows: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """§5: rows of masked tokens become exactly zero — a select, not a product, so NaN cannot leak."""
    return np.where(valid[:, None], rows, rows.dtype.type(0))


def forward_with_tape(
    cfg: PEERConfig, params, state, x, training=False, mask=None, routing=None, dy=None, compute_dtype=None
):
    """``forward`` after validating ``dy`` too, returning (y, new_state, aux, tape): the Tape of
    intermediates that ``peer_ref.backward_pass`` differentiates."""
    lead, low = validate(cfg, params, state, x, training, mask, routing, dy, compute_dtype)
    if low is not None:
        # §10.3 mixed mode: x (exact in the low dtype) widens exactly to the parameters' float32.
        x = x.astype(params["query.kernel"].dtype)
        params = read_params(params, low)
    tokens = int(np.prod(lead, dtype=np.int64))
    xf = x.reshape(tokens, cfg.d_model)
    valid = np.ones(tokens, bool) if mask is None else mask.reshape(tokens)
    if mask is not None:
        xf = zero_masked(xf, valid)  # §5: padding is inert, even NaN padding, in both passes

    # §3.2 query projection, §3.3 query norm, §3.4 split into heads
    q = xf @ params["query.kernel"]
    if cfg.query_bias:
        q = q + params["query.bias"]
    q, new_state, (normed, inv_std, batch_stats, n_valid) = query_norm(cfg, params, state, q, valid, training)
    queries = q.reshape(tokens, cfg.heads, cfg.d_key)

    # §3.5 sub-key scores, §3.6–3.8 product-key top-k (or the caller's routing)
    s_left, s_right = sub_key_scores(cfg, params, queries)
    if routing is None:
        indices = product_key_topk(cfg, s_left, s_right)
    else:
        indices = routing.reshape(tokens, cfg.heads, cfg.topk).astype(np.int64)
    scores = expert_scores(cfg, s_left, s_right, indices)

    # §3.9 router weights, §3.10 experts, §3.11 output
    weights = score_weights(cfg.score, scores)
    pre = np.einsum("td,thkd->thk", xf, params["experts.down"][indices])
    if cfg.expert_bias:
        pre = pre + params["experts.bias"][indices]
    hidden = activation(cfg.activation, pre)
    gate = expert_gate(cfg, params, xf, indices)
    if gate is not None:
        hidden = hidden * gate
    y = np.einsum("thk,thko->to", weights * hidden, params["experts.up"][indices])
    y = zero_masked(y, valid)

    aux = {
        "indices": indices.reshape(lead + (cfg.heads, cfg.topk)),
        "scores": scores.reshape(lead + (cfg.heads, cfg.topk)),
        "weights": weights.reshape(lead + (cfg.heads, cfg.topk)),
    }
    tape = Tape(
        lead, xf, valid, normed, inv_std, batch_stats, n_valid, queries, indices, weights, pre, gate, params, low
    )
    if low is not None:
        with np.errstate(over="ignore"):  # §10.1: beyond the low dtype's range is ±inf, as specified
            y = y.astype(low_numpy_dtype(low))  # §10.3: y is rounded once, at the end
    return y.reshape(lead + (cfg.d_out,)), new_state, aux, tape


def forward(
    cfg: PEERConfig,
    params: dict,
    state: dict,
    x: np.ndarray,
    training: bool = False,
    mask: np.ndarray | None = None,
    routing: np.ndarray | None = None,
    *,
    compute_dtype: str | None = None,
):
    """Apply the layer. Returns ``(y, new_state, aux)``; see SPEC §3 and §6.

    ``compute_dtype`` None (or the parameters' dtype) computes in the parameters' dtype, which x
    must have. "bfloat16" or "float16" with float32 parameters is the mixed mode of SPEC §10.3:
    x in that dtype, y in that dtype, state and aux scores/weights float32.
    Raises PEERInputError for any other combination.
    """
    y, new_state, aux, _ = forward_with_tape(
        cfg, params, state, x, training, mask, routing, compute_dtype=compute_dtype
    )
    return y, new_state, aux


def routing_scores(
    cfg: PEERConfig,
    params: dict,
    state: dict,
    x: np.ndarray,
    training: bool = False,
    mask: np.ndarray | None = None,
    *,
    compute_dtype: str | None = None,
) -> np.ndarray:
    """Routing oracle: the raw score of EVERY expert, shape (..., heads, n_experts).

    Expert i = left * n_keys + right scores s_left[left] + s_right[right] (SPEC §3.7).
    Conformance uses it to judge near ties against the reference's float64 scores.
    """
    _, _, _, tape = forward_with_tape(cfg, params, state, x, training, mask, compute_dtype=compute_dtype)
    s_left, s_right = sub_key_scores(cfg, tape.params, tape.queries)
    full = s_left[..., :, None] + s_right[..., None, :]
    return full.reshape(tape.lead + (cfg.heads, cfg.n_experts))
