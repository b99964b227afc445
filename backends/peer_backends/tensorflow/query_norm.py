"""Query batch norm (SPEC §3.3): statistics over the valid tokens, running statistics updated in
training."""

import tensorflow as tf

from .core import zero_masked


def query_norm(cfg, p, state, q, mask, training):
    if cfg.query_norm == "none":
        return q, dict(state)
    running_mean = tf.cast(state["query_norm.mean"], q.dtype)
    running_var = tf.cast(state["query_norm.var"], q.dtype)
    if training:
        valid = tf.ones_like(q[:, 0], tf.bool) if mask is None else mask
        n_valid = tf.reduce_sum(tf.cast(valid, q.dtype))
        use_batch = n_valid > 0
        count = tf.maximum(n_valid, 1)
        batch_mean = tf.reduce_sum(zero_masked(q, valid), axis=0) / count
        batch_var = tf.reduce_sum(zero_masked(q - batch_mean, valid) ** 2, axis=0) / count
        # No valid token: normalise with the running statistics and leave them unchanged.
        mean = tf.where(use_batch, batch_mean, running_mean)
        var = tf.where(use_batch, batch_var, running_var)
        m = cfg.bn_momentum
        unbiased = batch_var * (n_valid / tf.maximum(n_valid - 1, 1))
        updated = {
            "query_norm.mean": tf.where(use_batch, (1 - m) * running_mean + m * batch_mean, running_mean),
            "query_norm.var": tf.where(use_batch, (1 - m) * running_var + m * unbiased, running_var),
        }
        new_state = {name: tf.stop_gradient(tf.cast(value, state[name].dtype)) for name, value in updated.items()}
    else:
        mean, var, new_state = running_mean, running_var, dict(state)
    inv_std = 1.0 / tf.sqrt(var + cfg.bn_eps)
    return (q - mean) * inv_std * p["query_norm.scale"] + p["query_norm.offset"], new_state
