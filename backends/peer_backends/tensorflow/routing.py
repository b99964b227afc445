"""Routing (SPEC §3.4-§3.9, §4): queries, sub-key scores, product-key top-k with its tie and NaN
order, the selected experts' scores and the router weights."""

import tensorflow as tf

from .query_norm import query_norm


def route(cfg, training, p, state, x, mask, routing):
    """Query, batch norm, product-key top-k and router weights (SPEC §3.2-§3.9, §4).

    p: parameters in the compute dtype; x (T, d_model), masked tokens already zeroed; mask (T,)
    bool or None; routing (T, heads, topk) or None. Returns (new_state, indices, scores,
    weights), the last three (T, heads, topk).
    """
    q = tf.matmul(x, p["query.kernel"])
    if cfg.query_bias:
        q = q + p["query.bias"]
    q, new_state = query_norm(cfg, p, state, q, mask, training)
    queries = tf.reshape(q, (-1, cfg.heads, cfg.d_key))

    s_left, s_right = _sub_key_scores(cfg, p, queries)
    indices = _product_key_topk(cfg, s_left, s_right) if routing is None else tf.cast(routing, tf.int64)
    scores = tf.gather(s_left, indices // cfg.n_keys, batch_dims=2) + tf.gather(
        s_right, indices % cfg.n_keys, batch_dims=2
    )
    weights = _score_weights(cfg.score, scores)
    return new_state, indices, scores, weights


def _sub_key_scores(cfg, p, queries):
    halves = (queries[..., : cfg.d_half], queries[..., cfg.d_half :])
    keys = (p["keys.left"], p["keys.right"])
    if cfg.shared_keys:  # every head reads key set 0
        return tuple(tf.einsum("thd,nd->thn", q, k[0]) for q, k in zip(halves, keys))
    return tuple(tf.einsum("thd,hnd->thn", q, k) for q, k in zip(halves, keys))


def _orderable(scores):
    """Integer keys in the order of SPEC §4.1: value descending, +0 equal to -0, NaN below -inf.

    XLA's top_k orders floats totally (+0 above -0, NaN above everything); the bits of a float,
    with the magnitude bits of negatives flipped, compare as integers like the floats do, and
    NaN takes the lowest key.
    """
    ints = tf.int64 if scores.dtype == tf.float64 else tf.int32
    scores = scores if ints == tf.int64 else tf.cast(scores, tf.float32)
    bits = tf.bitcast(tf.where(scores == 0, tf.zeros_like(scores), scores), ints)
    keys = tf.where(bits < 0, tf.bitwise.bitwise_xor(bits, ints.max), bits)
    return tf.where(tf.math.is_nan(scores), tf.fill(tf.shape(keys), ints.min), keys)


def _top_k_positions(scores, k):
    """Positions of the top k along the last axis under SPEC §4.1's order.

    XLA's CPU top-k is fast for floats only (integer keys cost about 11x more at 2048 tokens x 8
    heads x 256 sub-keys). Without NaN, the floats with -0.0 made +0.0 are already in SPEC §4.1's
    order (equal values lower position first); the integer keys, which rank NaN below -inf, are
    used only when the scores hold a NaN (a real conditional, compiled or not).
    """
    return tf.cond(
        tf.reduce_any(tf.math.is_nan(scores)),
        lambda: tf.math.top_k(_orderable(scores), k).indices,
        lambda: tf.math.top_k(tf.where(scores == 0, tf.zeros_like(scores), scores), k).indices,
    )


def _product_key_topk(cfg, s_left, s_right):
    """Expert indices (T, heads, topk), int64, by the order rule of SPEC §4.

    tf.math.top_k returns equal values lower position first (checked by the tests), so
    stage 1 breaks ties by lower sub-key index. For stage 2 each side's selection is put
    in ascending sub-key order: the flattened k*k grid is then in ascending expert
    index (left * n_keys + right), and lower position means lower expert index.
    """
    k, n = cfg.topk, cfg.n_keys
    sides = []
    for scores in (s_left, s_right):
        sub_keys = tf.sort(_top_k_positions(scores, k), axis=-1)
        sides.append((tf.cast(sub_keys, tf.int64), tf.gather(scores, sub_keys, batch_dims=2)))
    (left, left_scores), (right, right_scores) = sides
    sums = tf.reshape(left_scores[..., :, None] + right_scores[..., None, :], (-1, cfg.heads, k * k))
    experts = tf.reshape(left[..., :, None] * n + right[..., None, :], (-1, cfg.heads, k * k))
    best = _top_k_positions(sums, k)
    return tf.gather(experts, best, batch_dims=2)


def _score_weights(name, scores):
    if name == "softmax":
        return tf.nn.softmax(scores, axis=-1)
    if name == "sigmoid":
        return tf.sigmoid(scores)
    return scores
