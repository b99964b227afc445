"""Analytic vector-Jacobian product of the forward pass (SPEC §7).

Routing is piecewise constant: the selected indices carry no gradient, while the
selected scores do, so gradients reach the query and the selected sub-keys. In
training mode they also flow through the batch statistics; running statistics
get none.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import checks
from .config import PEERConfig
from .forward_pass import forward_with_tape, low_numpy_dtype
from .functions import activation, activation_grad, score_weights_vjp


def vjp(
    cfg: PEERConfig,
    params: dict,
    state: dict,
    x: np.ndarray,
    dy: np.ndarray,
    training: bool = False,
    mask: np.ndarray | None = None,
    routing: np.ndarray | None = None,
    *,
    compute_dtype: str | None = None,
    sparse: bool = False,
):
    """Cotangents ``(grads, dx)`` of ``sum(forward(...)[0] * dy)``.

    ``grads`` holds every trainable parameter under its canonical name; ``dx`` has x's shape.
    In the mixed mode (``compute_dtype``, SPEC §10.3) dy has x's low dtype, every rounding of the
    forward counts as the identity, grads are float32 and dx is rounded once to the low dtype.
    With ``sparse=True`` the expert tables' gradients are :class:`RowSparse` (SPEC §7.1): the
    rows selected by valid tokens and the dense gradient's values there; the routing parameters'
    stay dense. Raises PEERInputError for a ``sparse`` that is not a bool.
    """
    checks.check_flag("sparse", sparse)
    _, _, _, tape = forward_with_tape(
        cfg, params, state, x, training, mask, routing, dy=dy, compute_dtype=compute_dtype
    )
    read = tape.params  # the values the forward used: rounded ones in the mixed mode
    if tape.low is not None:
        dy = dy.astype(tape.x.dtype)
    tokens = tape.x.shape[0]
    n, hk = cfg.n_keys, cfg.heads * cfg.topk
    idx = tape.indices
    dyf = np.where(tape.valid[:, None], dy.reshape(tokens, cfg.d_out), dy.dtype.type(0))
    grads = {name: np.zeros_like(value) for name, value in params.items()}

    # §3.11 output: y = sum_{h,k} w * a * up[idx]
    activated = activation(cfg.activation, tape.pre)
    hidden = activated if tape.gate is None else activated * tape.gate
    up_rows = read["experts.up"][idx]  # (T, h, k, d_out)
    d_coef = np.einsum("to,thko->thk", dyf, up_rows)
    np.add.at(
        grads["experts.up"],
        idx.reshape(-1),
        ((tape.weights * hidden)[..., None] * dyf[:, None, None, :]).reshape(tokens * hk, cfg.d_out),
    )

    # §3.10 experts: a = act(x . down[idx] + bias[idx]), times the gate x . gate[idx] with expert_glu
    d_hidden = d_coef * tape.weights
    if tape.gate is None:
        d_activated = d_hidden
    else:
        d_activated = d_hidden * tape.gate
        d_gate = d_hidden * activated
        dx_gate = np.einsum("thk,thkd->td", d_gate, read["experts.gate"][idx])
        np.add.at(
            grads["experts.gate"],
            idx.reshape(-1),
            (d_gate[..., None] * tape.x[:, None, None, :]).reshape(tokens * hk, cfg.d_model),
        )
    d_pre = d_activated * activation_grad(cfg.activation, tape.pre)
    down_rows = read["experts.down"][idx]
    dx = np.einsum("thk,thkd->td", d_pre, down_rows)
    if tape.gate is not None:
        dx = dx + dx_gate
    np.add.at(
        grads["experts.down"],
        idx.reshape(-1),
        (d_pre[..., None] * tape.x[:, None, None, :]).reshape(tokens * hk, cfg.d_model),
    )
    if cfg.expert_bias:
        np.add.at(grads["experts.bias"], idx.reshape(-1), d_pre.reshape(-1))

    # §3.9 router weights -> §3.7 raw scores -> §3.5 sub-key scores
    d_scores = score_weights_vjp(cfg.score, tape.weights, d_coef * hidden)
    d_left = _scatter_last(d_scores, idx // n, n)
    d_right = _scatter_last(d_scores, idx % n, n)
    q_left = tape.queries[..., : cfg.d_half]
    q_right = tape.queries[..., cfg.d_half :]
    d_queries = np.concatenate(
        [
            _sub_key_vjp(cfg, params["keys.left"], grads["keys.left"], d_left, q_left),
            _sub_key_vjp(cfg, params["keys.right"], grads["keys.right"], d_right, q_right),
        ],
        axis=-1,
    ).reshape(tokens, cfg.d_query)

    # §3.3 query norm, §3.2 query projection
    d_q = _query_norm_vjp(cfg, params, grads, tape, d_queries)
    grads["query.kernel"] = tape.x.T @ d_q
    if cfg.query_bias:
        grads["query.bias"] = d_q.sum(axis=0)
    dx = dx + d_q @ read["query.kernel"].T
    if tape.low is not None:
        with np.errstate(over="ignore"):  # §10.1: beyond the low dtype's range is ±inf, as specified
            dx = dx.astype(low_numpy_dtype(tape.low))  # §10.3: dx is rounded once, at the end
    if sparse:
        grads = sparsify(grads, gradient_rows(tape.indices, tape.valid))
    return grads, dx.reshape(tape.lead + (cfg.d_model,))


# SPEC §7.1: the tables indexed by expert, whose gradients can be row-sparse.
EXPERT_TABLES = ("experts.down", "experts.up", "experts.gate", "experts.bias")


class RowSparse(NamedTuple):
    """The row-sparse gradient of an expert table (SPEC §7.1).

    ``rows``: int64 (U,), sorted and unique, the experts selected by at least one valid token;
    ``values``: (U,) + the table's row shape, in the gradient's dtype, the dense gradient's rows
    ``rows``. Every other row of the dense gradient is exactly zero.
    """

    rows: np.ndarray
    values: np.ndarray

    def densify(self, n_rows: int) -> np.ndarray:
        """The dense (n_rows, ...) gradient: ``values`` at ``rows``, exact zeros elsewhere."""
        dense = np.zeros((n_rows,) + self.values.shape[1:], self.values.dtype)
        dense[self.rows] = self.values
        return dense


def gradient_rows(indices: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The rows of a row-sparse table gradient (SPEC §7.1): the sorted unique experts in
    ``indices`` (T, heads, topk) of the tokens where ``valid`` (T,) is True, as int64 (U,)."""
    return np.unique(np.asarray(indices)[np.asarray(valid, bool)].reshape(-1).astype(np.int64))


def sparsify(grads: dict, rows: np.ndarray) -> dict:
    """``grads`` with each expert table's dense gradient replaced by its :class:`RowSparse` at ``rows``."""
    return {name: RowSparse(rows, value[rows]) if name in EXPERT_TABLES else value for name, value in grads.items()}


def _scatter_last(values: np.ndarray, positions: np.ndarray, size: int) -> np.ndarray:
    """out[..., p] += values[..., j] for p = positions[..., j] (duplicates accumulate)."""
    out = np.zeros(values.shape[:-1] + (size,), values.dtype)
    width = values.shape[-1]
    # An explicit width (not -1) so that zero rows (no tokens) still reshape.
    flat_out = out.reshape(-1, size)
    rows = np.arange(flat_out.shape[0])[:, None]
    np.add.at(flat_out, (rows, positions.reshape(-1, width)), values.reshape(-1, width))
    return out


def _sub_key_vjp(
    cfg: PEERConfig, keys: np.ndarray, d_keys: np.ndarray, d_scores: np.ndarray, q_half: np.ndarray
) -> np.ndarray:
    """Backward of s = einsum('thd,hnd->thn', q_half, keys); accumulates into d_keys in place."""
    per_head = np.broadcast_to(keys, (cfg.heads,) + keys.shape[1:]) if cfg.shared_keys else keys
    d_q = np.einsum("thn,hnd->thd", d_scores, per_head)
    d_per_head = np.einsum("thn,thd->hnd", d_scores, q_half)
    d_keys += d_per_head.sum(axis=0, keepdims=True) if cfg.shared_keys else d_per_head
    return d_q


def _query_norm_vjp(cfg: PEERConfig, params, grads, tape, d_out: np.ndarray) -> np.ndarray:
    if cfg.query_norm == "none":
        return d_out
    grads["query_norm.scale"] = (d_out * tape.normed).sum(axis=0)
    grads["query_norm.offset"] = d_out.sum(axis=0)
    d_normed = d_out * params["query_norm.scale"]
    if not tape.batch_stats:
        return d_normed * tape.inv_std
    # normed_s = (q_s - mean) * inv_std for every token s; mean and var use valid tokens only.
    weight = tape.valid.astype(d_out.dtype)[:, None] / tape.n_valid
    total = d_normed.sum(axis=0)
    total_dot = (d_normed * tape.normed).sum(axis=0)
    return tape.inv_std * (d_normed - weight * (total + tape.normed * total_dot))
