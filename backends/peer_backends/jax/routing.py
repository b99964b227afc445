"""Routing (SPEC §3.4-§3.9, §4): queries, sub-key scores, product-key top-k with its tie and NaN
order, the selected experts' scores and the router weights."""

import jax
import jax.numpy as jnp
from jax import lax

from .core import HIGHEST, index_dtype
from .query_norm import query_norm

_SCORE_WEIGHTS = {
    "softmax": lambda s: jax.nn.softmax(s, axis=-1),
    "sigmoid": jax.nn.sigmoid,
    "none": lambda s: s,
}


def route(cfg, training, p, state, xf, valid, routing):
    """Query, batch norm, product-key top-k and router weights (SPEC §3.2-§3.9, §4).

    p: parameters in the compute dtype; xf (T, d_model), masked tokens already zeroed; valid (T,)
    bool; routing (..., heads, topk) or None. Returns (new_state, indices, scores, weights), the
    last three (T, heads, topk); only the selected scores carry gradient to the sub-keys.
    """
    tokens = xf.shape[0]
    q = jnp.matmul(xf, p["query.kernel"], precision=HIGHEST)
    if cfg.query_bias:
        q = q + p["query.bias"]
    q, new_state = query_norm(cfg, p, state, q, valid, training)
    queries = q.reshape(tokens, cfg.heads, cfg.d_key)
    s_left = _sub_key_scores(cfg, queries[..., : cfg.d_half], p["keys.left"])
    s_right = _sub_key_scores(cfg, queries[..., cfg.d_half :], p["keys.right"])
    if routing is None:
        indices = _product_key_topk(cfg, lax.stop_gradient(s_left), lax.stop_gradient(s_right))
    else:
        indices = routing.reshape(tokens, cfg.heads, cfg.topk).astype(index_dtype())
    n = cfg.n_keys
    scores = (jnp.take_along_axis(s_left, indices // n, axis=-1)
              + jnp.take_along_axis(s_right, indices % n, axis=-1))
    return new_state, indices, scores, _SCORE_WEIGHTS[cfg.score](scores)


def _sub_key_scores(cfg, q_half, keys):
    """(T, heads, d_half) x key sets -> (T, heads, n_keys); shared keys: every head reads set 0."""
    if cfg.shared_keys:
        return jnp.einsum("thd,nd->thn", q_half, keys[0], precision=HIGHEST)
    return jnp.einsum("thd,hnd->thn", q_half, keys, precision=HIGHEST)


def _rank_keys(scores):
    """Integer keys in the order of SPEC §4.1: value descending, +0 equal to -0, NaN below -inf.

    lax.top_k orders floats totally (-0.0 below +0.0, NaN above everything); the bits of a
    float, with the magnitude bits of negatives flipped, compare as integers like the floats do,
    and NaN takes the lowest key. top_k puts the lower position first among equal keys.
    """
    ints = jnp.int64 if scores.dtype == jnp.float64 else jnp.int32
    scores = scores.astype(jnp.float32) if ints == jnp.int32 else scores
    bits = lax.bitcast_convert_type(jnp.where(scores == 0, jnp.zeros((), scores.dtype), scores), ints)
    keys = jnp.where(bits < 0, bits ^ jnp.iinfo(ints).max, bits)
    return jnp.where(jnp.isnan(scores), jnp.iinfo(ints).min, keys)


def _top_k_positions(scores, k):
    """Positions of the top k along the last axis under SPEC §4.1's order.

    Integer keys cost: XLA's CPU top-k is fast for floats only (about 11x slower on int32 keys,
    2048 tokens x 8 heads x 256 sub-keys). Without NaN, the floats with -0.0 made +0.0 are
    already in the order of SPEC §4.1 (top_k puts the lower position first among equals); the
    integer keys are needed only to rank NaN below -inf, so only a call whose scores hold a NaN
    takes that branch (a real conditional under jit).
    """
    def floats(values):
        return lax.top_k(jnp.where(values == 0, jnp.zeros((), values.dtype), values), k)[1]

    def keys(values):
        return lax.top_k(_rank_keys(values), k)[1]

    return lax.cond(jnp.isnan(scores).any(), keys, floats, scores)


def _top_k_lower_index(scores, k):
    """(values, positions) of the top k under SPEC §4.1's order."""
    positions = _top_k_positions(scores, k)
    return jnp.take_along_axis(scores, positions, axis=-1), positions


def _product_key_topk(cfg, s_left, s_right):
    """Two-stage product-key search with the SPEC §4 tie rule; (T, heads, topk) expert indices."""
    k, n = cfg.topk, cfg.n_keys
    top_left, pos_left = _top_k_lower_index(s_left, k)
    top_right, pos_right = _top_k_lower_index(s_right, k)
    # With each side's winners in ascending sub-key order, the left-major k*k candidates
    # ascend in expert index (left * n + right), so top_k's lower-position-first rule on
    # equal sums is exactly the lower-expert-index rule.
    pos_left, top_left = lax.sort((pos_left, top_left), num_keys=1)
    pos_right, top_right = lax.sort((pos_right, top_right), num_keys=1)
    lead = s_left.shape[:-1]
    sums = (top_left[..., :, None] + top_right[..., None, :]).reshape(lead + (k * k,))
    experts = (pos_left.astype(index_dtype())[..., :, None] * n + pos_right[..., None, :]).reshape(lead + (k * k,))
    best = _top_k_positions(sums, k)
    return jnp.take_along_axis(experts, best, axis=-1)
