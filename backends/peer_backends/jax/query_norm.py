"""Query batch norm (SPEC §3.3): statistics over the valid tokens, running statistics updated in
training, branch-free in the token count."""

import jax.numpy as jnp
from jax import lax


def query_norm(cfg, p, state, q, valid, training):
    """Batch norm over valid tokens (SPEC §3.3); returns (normalised query, new state)."""
    if cfg.query_norm == "none":
        return q, dict(state)
    running_mean = state["query_norm.mean"].astype(q.dtype)
    running_var = state["query_norm.var"].astype(q.dtype)
    if training:
        n_valid = valid.sum()
        # max(n, 1) keeps the unused batch branch finite (and its gradient free of 0/0) when n == 0.
        count = jnp.maximum(n_valid, 1).astype(q.dtype)
        batch_mean = jnp.where(valid[:, None], q, 0).sum(axis=0) / count
        batch_var = jnp.where(valid[:, None], (q - batch_mean) ** 2, 0).sum(axis=0) / count
        use_batch = n_valid > 0
        m = cfg.bn_momentum
        unbiased = batch_var * (count / jnp.maximum(count - 1, 1))
        new_state = {}
        for name, batch_value in (("query_norm.mean", batch_mean), ("query_norm.var", unbiased)):
            old = state[name]
            updated = ((1 - m) * old + m * lax.stop_gradient(batch_value)).astype(old.dtype)
            new_state[name] = jnp.where(use_batch, updated, old)
        mean = jnp.where(use_batch, batch_mean, running_mean)
        var = jnp.where(use_batch, batch_var, running_var)
    else:
        mean, var, new_state = running_mean, running_var, dict(state)
    normed = (q - mean) * (1 / jnp.sqrt(var + cfg.bn_eps))
    return normed * p["query_norm.scale"] + p["query_norm.offset"], new_state
