"""Query batch norm and its running statistics (SPEC §3.3), checked against hand computations.

The normalised queries are observed through aux["scores"]: for the returned indices they are
s_left[left] + s_right[right] of the normalised queries, so a wrong mean or variance shows there.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import peer_ref
from peer_ref.routing import expert_scores


def _setup(momentum=0.1, query_bias=True, seed=0, dtype="float64"):
    cfg = peer_ref.PEERConfig(
        d_model=3, n_experts=9, heads=2, topk=2, d_key=4, bn_momentum=momentum, query_bias=query_bias
    )
    rng = np.random.default_rng(seed)
    params, state = peer_ref.init(cfg, seed=seed, dtype=dtype)
    params = {k: (v + 0.5 * rng.standard_normal(v.shape)).astype(dtype) for k, v in params.items()}
    state = {
        "query_norm.mean": rng.standard_normal(cfg.d_query).astype(dtype),
        "query_norm.var": (0.5 + rng.random(cfg.d_query)).astype(dtype),
    }
    return cfg, params, state, rng


def _queries(cfg, params, x2d):
    q = x2d @ params["query.kernel"]
    return q + params["query.bias"] if cfg.query_bias else q


def _expected_scores(cfg, params, normed, indices):
    """Raw scores of the given indices for standardised queries ``normed`` (T, d_query)."""
    queries = (normed * params["query_norm.scale"] + params["query_norm.offset"]).reshape(-1, cfg.heads, cfg.d_key)
    s_left, s_right = peer_ref.sub_key_scores(cfg, params, queries)
    return expert_scores(cfg, s_left, s_right, indices.reshape(-1, cfg.heads, cfg.topk)), peer_ref.product_key_topk(
        cfg, s_left, s_right
    )


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 7), st.floats(0.0, 1.0), st.booleans(), st.integers(0, 2**32 - 1))
def test_training_uses_biased_batch_stats_and_updates_running_stats(tokens, momentum, use_mask, seed):
    cfg, params, state, rng = _setup(momentum, seed=seed)
    x = rng.standard_normal((tokens, cfg.d_model))
    mask = rng.random(tokens) < 0.6 if use_mask else None
    valid = np.ones(tokens, bool) if mask is None else mask
    before = {k: v.copy() for k, v in state.items()}
    _, new_state, aux = peer_ref.forward(cfg, params, state, x, training=True, mask=mask)
    for k in state:
        np.testing.assert_array_equal(state[k], before[k], err_msg=f"forward mutated state[{k!r}] in place")

    q = _queries(cfg, params, np.where(valid[:, None], x, 0.0))  # masked tokens are routed as zero input
    n = int(valid.sum())
    if n == 0:
        mean, var = state["query_norm.mean"], state["query_norm.var"]
        want_state = state
    else:
        mean = q[valid].mean(axis=0)
        var = q[valid].var(axis=0)  # biased, ddof=0, for normalising
        running_var = q[valid].var(axis=0, ddof=1) if n > 1 else np.zeros(cfg.d_query)
        want_state = {
            "query_norm.mean": (1 - momentum) * state["query_norm.mean"] + momentum * mean,
            "query_norm.var": (1 - momentum) * state["query_norm.var"] + momentum * running_var,
        }
    for k in want_state:
        np.testing.assert_allclose(new_state[k], want_state[k], rtol=1e-12, atol=1e-12, err_msg=k)
    normed = (q - mean) / np.sqrt(var + cfg.bn_eps)
    want_scores, want_indices = _expected_scores(cfg, params, normed, aux["indices"])
    # All tokens are normalised with the valid tokens' statistics, masked ones (zeroed) included.
    np.testing.assert_allclose(aux["scores"], want_scores, rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(aux["indices"], want_indices)


def test_single_valid_token_keeps_its_mean_and_shrinks_the_running_var():
    cfg, params, state, rng = _setup(momentum=0.25)
    x = rng.standard_normal((1, cfg.d_model))
    _, new_state, aux = peer_ref.forward(cfg, params, state, x, training=True)
    q = _queries(cfg, params, x)[0]
    np.testing.assert_allclose(new_state["query_norm.mean"], 0.75 * state["query_norm.mean"] + 0.25 * q, rtol=1e-13)
    # n == 1: batch variance 0 and the n/(n-1) factor is taken as 1, not a division by zero.
    np.testing.assert_allclose(new_state["query_norm.var"], 0.75 * state["query_norm.var"], rtol=1e-13)
    want_scores, _ = _expected_scores(cfg, params, np.zeros((1, cfg.d_query)), aux["indices"])
    np.testing.assert_allclose(aux["scores"], want_scores, rtol=1e-12, atol=1e-12)


def test_no_valid_token_in_training_uses_running_stats_and_keeps_state():
    cfg, params, state, rng = _setup()
    x = rng.standard_normal((4, cfg.d_model))
    for xs, mask in ((x, np.zeros(4, bool)), (x[:0], None), (x[:0].reshape(2, 0, 3), np.zeros((2, 0), bool))):
        y_train, s_train, aux_train = peer_ref.forward(cfg, params, state, xs, training=True, mask=mask)
        y_eval, s_eval, aux_eval = peer_ref.forward(cfg, params, state, xs, training=False, mask=mask)
        for k in state:
            np.testing.assert_array_equal(s_train[k], state[k])
            np.testing.assert_array_equal(s_eval[k], state[k])
        np.testing.assert_array_equal(aux_train["scores"], aux_eval["scores"])
        np.testing.assert_array_equal(y_train, y_eval)
        assert y_train.shape == xs.shape[:-1] + (cfg.d_out,)


def test_evaluation_uses_running_stats_and_keeps_state():
    cfg, params, state, rng = _setup()
    x = rng.standard_normal((5, cfg.d_model))
    _, new_state, aux = peer_ref.forward(cfg, params, state, x, training=False)
    for k in state:
        np.testing.assert_array_equal(new_state[k], state[k])
    normed = (_queries(cfg, params, x) - state["query_norm.mean"]) / np.sqrt(state["query_norm.var"] + cfg.bn_eps)
    want_scores, want_indices = _expected_scores(cfg, params, normed, aux["indices"])
    np.testing.assert_allclose(aux["scores"], want_scores, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(aux["indices"], want_indices)
    _, _, aux_train = peer_ref.forward(cfg, params, state, x, training=True)
    assert not np.allclose(aux_train["scores"], aux["scores"]), "training and evaluation should differ here"


def test_momentum_extremes():
    for momentum in (0.0, 1.0):
        cfg, params, state, rng = _setup(momentum)
        x = rng.standard_normal((6, cfg.d_model))
        _, new_state, _ = peer_ref.forward(cfg, params, state, x, training=True)
        q = _queries(cfg, params, x)
        want = state if momentum == 0.0 else {"query_norm.mean": q.mean(0), "query_norm.var": q.var(0, ddof=1)}
        for k in state:
            np.testing.assert_allclose(new_state[k], want[k], rtol=1e-13, atol=1e-15, err_msg=f"{k}, m={momentum}")


def test_bn_eps_enters_inside_the_square_root():
    cfg = peer_ref.PEERConfig(d_model=2, n_experts=4, heads=1, topk=1, d_key=2, bn_eps=0.5)
    params, state = peer_ref.init(cfg, seed=3)
    x = np.random.default_rng(3).standard_normal((3, 2))
    _, _, aux = peer_ref.forward(cfg, params, state, x, training=False)
    # Running stats are mean 0, var 1 at init: the queries are q / sqrt(1.5).
    want_scores, _ = _expected_scores(cfg, params, _queries(cfg, params, x) / np.sqrt(1.5), aux["indices"])
    np.testing.assert_allclose(aux["scores"], want_scores, rtol=1e-13)


def test_float32_state_stays_float32():
    cfg, params, state, rng = _setup(dtype="float32")
    x = rng.standard_normal((4, cfg.d_model)).astype(np.float32)
    y, new_state, aux = peer_ref.forward(cfg, params, state, x, training=True)
    assert y.dtype == np.float32 and aux["scores"].dtype == np.float32 and aux["weights"].dtype == np.float32
    for k, v in new_state.items():
        assert v.dtype == np.float32, f"new_state[{k!r}].dtype={v.dtype}, but should be float32"
