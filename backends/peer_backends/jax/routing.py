"""Routing (SPEC §3.4-§3.9, §4): queries, sub-key scores, product-key top-k with its tie and NaN
order, the selected experts' scores and the router weights."""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from peer_ref.routing import pruned_candidates

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
    scores = jnp.take_along_axis(s_left, indices // n, axis=-1) + jnp.take_along_axis(s_right, indices % n, axis=-1)
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


@functools.partial(jax.jit, static_argnums=0)
def _product_key_topk(cfg, s_left, s_right):
    """Two-stage product-key search with the SPEC §4 tie rule; (T, heads, topk) expert indices.

    Stage two scores only ``peer_ref.routing.pruned_candidates`` (50 + 15 of the 256 pairs
    for k = 16): XLA's CPU top-k costs about 1 us per row plus 6 ns per element. A row where
    that lemma does not decide the answer (a tie among the k+1 best kept sums, or a non-finite
    stage-one value) is redone over all k*k pairs under the full order: up to
    ``redo_budget(rows)`` such rows are gathered and redone, past that every row is (a real
    conditional under jit); with the rows split over a mesh (explicit sharding), any such row
    has every row redone. At the cpu benchmark preset (2048 tokens, 8 heads, k = 16, float32)
    0 to 2 of the 16384 rows were open per call (5 draws). Compiled as one program also when
    the layer runs op by op (``jit=False``): dispatched op by op, its slices, conditionals and
    row picks took longer than the whole compiled layer.
    """
    k, n = cfg.topk, cfg.n_keys
    lead = s_left.shape[:-1]
    rows = math.prod(lead)
    # Each side's k best, value descending, ties to the lower sub-key.
    sides = [_top_k_lower_index(s.reshape(rows, n), k) for s in (s_left, s_right)]
    (top_left, pos_left), (top_right, pos_right) = sides
    a, b = pruned_candidates(k)
    if a.size >= k * k or rows == 0:
        return _all_pairs_topk(n, k, top_left, pos_left, top_right, pos_right).reshape(lead + (k,))
    # The candidates of row a are a prefix of right ranks: static slices, row-local (no gather,
    # so a token-sharded layout stays sharded).
    prefixes = [(rank, int((a == rank).sum())) for rank in range(k)]
    sums = jnp.concatenate([top_left[:, r : r + 1] + top_right[:, :m] for r, m in prefixes], axis=-1)
    candidates = jnp.concatenate(
        [pos_left[:, r : r + 1].astype(index_dtype()) * n + pos_right[:, :m] for r, m in prefixes], axis=-1
    )
    # The barrier keeps XLA from folding the slices below into the top-k, which would turn it
    # from its TopK kernel into a full sort (3.8x slower here).
    best, chosen = lax.optimization_barrier(lax.top_k(sums, k + 1))
    experts = jnp.take_along_axis(candidates, chosen[:, :k], axis=-1)
    undecided = (
        (best[:, 1:] == best[:, :-1]).any(-1) | ~jnp.isfinite(top_left).all(-1) | ~jnp.isfinite(top_right).all(-1)
    )
    budget = redo_budget(rows)

    def redo_some(experts):
        # Padding picks row 0 again; its full-order answer is its answer either way.
        (picked,) = jnp.nonzero(undecided, size=budget, fill_value=0)
        redone = _all_pairs_topk(n, k, top_left[picked], pos_left[picked], top_right[picked], pos_right[picked])
        return experts.at[picked].set(redone)

    def redo_all(experts):
        return _all_pairs_topk(n, k, top_left, pos_left, top_right, pos_right)

    if _rows_split(undecided):
        # Rows split over a mesh (explicit sharding): picking rows would gather across devices.
        return lax.cond(undecided.any(), redo_all, lambda e: e, experts).reshape(lead + (k,))
    experts = lax.cond(undecided.sum() > budget, redo_all, redo_some, experts)
    return experts.reshape(lead + (k,))


def _rows_split(array):
    """Whether ``array``'s first axis is split over mesh axes in its type (explicit sharding)."""
    spec = getattr(jax.typeof(array).sharding, "spec", ())
    return len(spec) > 0 and spec[0] is not None


def redo_budget(rows):
    """How many of ``rows`` rows the pruned search redoes one by one before it redoes them all."""
    return min(rows, 32 + rows // 64)


def _all_pairs_topk(n, k, top_left, pos_left, top_right, pos_right):
    """The k best of all k*k candidates under the full order, for (R, k) stage-one lists."""
    # With each side's winners in ascending sub-key order, the left-major k*k candidates
    # ascend in expert index (left * n + right), so top_k's lower-position-first rule on
    # equal sums is exactly the lower-expert-index rule.
    pos_left, top_left = lax.sort((pos_left, top_left), num_keys=1)
    pos_right, top_right = lax.sort((pos_right, top_right), num_keys=1)
    rows = top_left.shape[0]
    sums = (top_left[:, :, None] + top_right[:, None, :]).reshape(rows, k * k)
    experts = (pos_left.astype(index_dtype())[:, :, None] * n + pos_right[:, None, :]).reshape(rows, k * k)
    return jnp.take_along_axis(experts, _top_k_positions(sums, k), axis=-1)
