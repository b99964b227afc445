"""Structural properties of the forward pass (SPEC §3, §5, §6) that hold for any parameters."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import peer_ref


@st.composite
def layers(draw, **fixed):
    n_keys = draw(st.integers(1, 4))
    options = dict(
        d_model=draw(st.integers(1, 4)),
        n_experts=n_keys * n_keys,
        heads=draw(st.integers(1, 3)),
        topk=draw(st.integers(1, n_keys)),
        d_key=2 * draw(st.integers(1, 2)),
        d_out=draw(st.integers(1, 4)),
        shared_keys=draw(st.booleans()),
        query_norm=draw(st.sampled_from(peer_ref.QUERY_NORMS)),
        query_bias=draw(st.booleans()),
        activation=draw(st.sampled_from(peer_ref.ACTIVATIONS)),
        score=draw(st.sampled_from(peer_ref.SCORES)),
        expert_bias=draw(st.booleans()),
        expert_glu=draw(st.booleans()),
    )
    options.update(fixed)
    cfg = peer_ref.PEERConfig(**options)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    params, state = peer_ref.init(cfg, seed=seed)
    params = {k: v + 0.3 * rng.standard_normal(v.shape) for k, v in params.items()}
    state = {k: np.abs(v + 0.3 * rng.standard_normal(v.shape)) for k, v in state.items()}
    return cfg, params, state, rng


def _head_slice(cfg, params, state, head):
    """A one-head layer that computes head ``head`` of ``cfg`` on its own."""
    single = peer_ref.PEERConfig.from_dict({**cfg.to_dict(), "heads": 1})
    cols = slice(head * cfg.d_key, (head + 1) * cfg.d_key)
    keys = slice(0, 1) if cfg.shared_keys else slice(head, head + 1)
    sliced = {}
    for name, value in params.items():
        if name in ("query.kernel",):
            sliced[name] = value[:, cols]
        elif name in ("query.bias", "query_norm.scale", "query_norm.offset"):
            sliced[name] = value[cols]
        elif name.startswith("keys."):
            sliced[name] = value[keys]
        else:
            sliced[name] = value
    sliced_state = {name: value[cols] for name, value in state.items()}
    # experts.up's init std depends on heads*topk, but here the values are given, not drawn.
    return single, sliced, sliced_state


@settings(max_examples=60, deadline=None)
@given(layers(), st.booleans(), st.integers(0, 5))
def test_output_is_the_sum_of_per_head_outputs(layer, training, tokens):
    cfg, params, state, rng = layer
    x = rng.standard_normal((tokens, cfg.d_model))
    mask = rng.random(tokens) < 0.7
    y, new_state, aux = peer_ref.forward(cfg, params, state, x, training, mask)
    total = np.zeros_like(y)
    for head in range(cfg.heads):
        single, p, s = _head_slice(cfg, params, state, head)
        y_head, s_head, aux_head = peer_ref.forward(single, p, s, x, training, mask)
        total += y_head
        np.testing.assert_array_equal(aux_head["indices"][:, 0], aux["indices"][:, head])
        np.testing.assert_allclose(aux_head["scores"][:, 0], aux["scores"][:, head], rtol=1e-12, atol=1e-12)
        cols = slice(head * cfg.d_key, (head + 1) * cfg.d_key)
        for name in new_state:
            np.testing.assert_allclose(s_head[name], new_state[name][cols], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y, total, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("glu", [False, True])
def test_one_head_one_expert_by_hand(glu):
    for activation in ("relu", "identity", "gelu", "silu", "gelu_tanh"):
        for score in peer_ref.SCORES:
            cfg = peer_ref.PEERConfig(
                d_model=3,
                n_experts=9,
                heads=1,
                topk=1,
                d_key=2,
                d_out=2,
                query_norm="none",
                activation=activation,
                score=score,
                expert_glu=glu,
            )
            params, state = peer_ref.init(cfg, seed=11)
            params["experts.bias"] = np.linspace(-0.5, 0.5, 9)
            x = np.array([0.3, -1.2, 0.8])
            y, _, aux = peer_ref.forward(cfg, params, state, x)
            q = x @ params["query.kernel"]
            left = params["keys.left"][0, :, 0] * q[0]
            right = params["keys.right"][0, :, 0] * q[1]
            full = left[:, None] + right[None, :]
            best = int(np.argmax(full))  # argmax returns the first, i.e. lowest, index on a tie
            score_value = full.flat[best]
            weight = {"softmax": 1.0, "sigmoid": 1 / (1 + math.exp(-score_value)), "none": score_value}[score]
            pre = x @ params["experts.down"][best] + params["experts.bias"][best]
            hidden = {
                "relu": max(pre, 0.0),
                "identity": pre,
                "gelu": 0.5 * pre * (1 + math.erf(pre / math.sqrt(2))),
                "silu": pre / (1 + math.exp(-pre)),
                "gelu_tanh": 0.5 * pre * (1 + math.tanh(math.sqrt(2 / math.pi) * (pre + 0.044715 * pre**3))),
            }[activation]
            if glu:  # SPEC §3.10: the activated branch times the linear gate g_i . x, no bias on the gate
                hidden *= x @ params["experts.gate"][best]
            np.testing.assert_array_equal(aux["indices"], [[best]])
            np.testing.assert_allclose(aux["scores"], [[score_value]], rtol=1e-14)
            np.testing.assert_allclose(aux["weights"], [[weight]], rtol=1e-14)
            np.testing.assert_allclose(
                y,
                weight * hidden * params["experts.up"][best],
                rtol=1e-13,
                atol=1e-15,
                err_msg=f"{activation}, {score}",
            )


@settings(max_examples=40, deadline=None)
@given(layers(), st.booleans(), st.integers(1, 5))
def test_routing_override_with_own_routing_equals_forward(layer, training, tokens):
    cfg, params, state, rng = layer
    x = rng.standard_normal((tokens, cfg.d_model))
    dy = rng.standard_normal((tokens, cfg.d_out))
    y, new_state, aux = peer_ref.forward(cfg, params, state, x, training)
    for routing in (aux["indices"], aux["indices"].astype(np.int32)):
        y2, state2, aux2 = peer_ref.forward(cfg, params, state, x, training, routing=routing)
        np.testing.assert_array_equal(y2, y)
        for name in aux:
            np.testing.assert_array_equal(aux2[name], aux[name], err_msg=name)
        for name in new_state:
            np.testing.assert_array_equal(state2[name], new_state[name], err_msg=name)
    grads, dx = peer_ref.vjp(cfg, params, state, x, dy, training)
    grads2, dx2 = peer_ref.vjp(cfg, params, state, x, dy, training, routing=aux["indices"])
    np.testing.assert_array_equal(dx2, dx)
    for name in grads:
        np.testing.assert_array_equal(grads2[name], grads[name], err_msg=name)


def test_routing_override_scores_follow_the_given_order_and_duplicates():
    cfg = peer_ref.PEERConfig(d_model=3, n_experts=9, heads=2, topk=3, d_key=4, query_norm="none")
    params, state = peer_ref.init(cfg, seed=5)
    x = np.random.default_rng(5).standard_normal((2, 3))
    routing = np.array([[[8, 0, 8], [4, 3, 2]], [[1, 1, 1], [0, 5, 7]]])
    _, _, aux = peer_ref.forward(cfg, params, state, x, routing=routing)
    queries = (x @ params["query.kernel"]).reshape(2, 2, 4)
    s_left, s_right = peer_ref.sub_key_scores(cfg, params, queries)
    want = np.take_along_axis(s_left, routing // 3, -1) + np.take_along_axis(s_right, routing % 3, -1)
    np.testing.assert_array_equal(aux["indices"], routing)
    np.testing.assert_allclose(aux["scores"], want, rtol=1e-14)


@settings(max_examples=40, deadline=None)
@given(layers(), st.booleans(), st.integers(1, 6), st.data())
def test_token_order_is_irrelevant(layer, training, tokens, data):
    cfg, params, state, rng = layer
    x = rng.standard_normal((tokens, cfg.d_model))
    perm = np.array(data.draw(st.permutations(range(tokens))))
    y, new_state, aux = peer_ref.forward(cfg, params, state, x, training)
    y_p, state_p, aux_p = peer_ref.forward(cfg, params, state, x[perm], training)
    # Training statistics are sums in a different order: equal up to rounding, not bitwise.
    np.testing.assert_allclose(y_p, y[perm], rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(aux_p["indices"], aux["indices"][perm])
    for name in new_state:
        np.testing.assert_allclose(state_p[name], new_state[name], rtol=1e-12, atol=1e-14)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@settings(max_examples=40, deadline=None)
@given(layers(), st.booleans(), st.integers(1, 6), st.sampled_from([np.nan, np.inf, 1e30, 0.0]))
def test_masked_tokens_change_nothing_and_output_zero(layer, training, tokens, garbage):
    cfg, params, state, rng = layer
    x = rng.standard_normal((tokens, cfg.d_model))
    mask = rng.random(tokens) < 0.6
    y, new_state, aux = peer_ref.forward(cfg, params, state, x, training, mask)
    x_garbage = np.where(mask[:, None], x, garbage)
    y_g, state_g, aux_g = peer_ref.forward(cfg, params, state, x_garbage, training, mask)
    assert np.all(y_g[~mask] == 0) and np.all(y[~mask] == 0), "masked tokens must output exactly 0"
    np.testing.assert_array_equal(y_g[mask], y[mask])
    np.testing.assert_array_equal(aux_g["indices"][mask], aux["indices"][mask])
    for name in new_state:
        np.testing.assert_array_equal(state_g[name], new_state[name], err_msg=name)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_nan_token_in_evaluation_only_affects_itself():
    cfg = peer_ref.PEERConfig(d_model=3, n_experts=16, heads=2, topk=2, d_key=4)
    params, state = peer_ref.init(cfg, seed=2)
    x = np.random.default_rng(2).standard_normal((4, 3))
    y, _, _ = peer_ref.forward(cfg, params, state, x)
    x[2, 1] = np.nan
    y_nan, new_state, _ = peer_ref.forward(cfg, params, state, x)
    assert np.all(np.isnan(y_nan[2])), f"y[2]={y_nan[2]}, but a NaN input should give a NaN output"
    np.testing.assert_array_equal(np.delete(y_nan, 2, 0), np.delete(y, 2, 0))
    for name in state:
        np.testing.assert_array_equal(new_state[name], state[name])


@settings(max_examples=30, deadline=None)
@given(layers(), st.booleans(), st.sampled_from([(), (1,), (5,), (2, 3), (3, 1, 2)]))
def test_leading_dims_are_flattened(layer, training, lead):
    cfg, params, state, rng = layer
    x = rng.standard_normal(lead + (cfg.d_model,))
    mask = rng.random(lead) < 0.8
    dy = rng.standard_normal(lead + (cfg.d_out,))
    y, new_state, aux = peer_ref.forward(cfg, params, state, x, training, mask)
    flat = (-1, cfg.d_model)
    y_f, state_f, aux_f = peer_ref.forward(cfg, params, state, x.reshape(flat), training, mask.reshape(-1))
    assert y.shape == lead + (cfg.d_out,)
    np.testing.assert_array_equal(y.reshape(-1, cfg.d_out), y_f)
    for name in aux:
        assert aux[name].shape == lead + (cfg.heads, cfg.topk), name
        np.testing.assert_array_equal(aux[name].reshape(aux_f[name].shape), aux_f[name])
    assert aux["indices"].dtype == np.int64
    for name in new_state:
        np.testing.assert_array_equal(state_f[name], new_state[name])
    grads, dx = peer_ref.vjp(cfg, params, state, x, dy, training, mask)
    grads_f, dx_f = peer_ref.vjp(
        cfg, params, state, x.reshape(flat), dy.reshape(-1, cfg.d_out), training, mask.reshape(-1)
    )
    assert dx.shape == x.shape
    np.testing.assert_array_equal(dx.reshape(flat), dx_f)
    for name in grads:
        np.testing.assert_array_equal(grads[name], grads_f[name])


def test_zero_tokens():
    cfg = peer_ref.PEERConfig(d_model=3, n_experts=9, heads=2, topk=2, d_key=4, d_out=5)
    params, state = peer_ref.init(cfg, seed=0)
    for lead in ((0,), (2, 0), (0, 4)):
        x = np.zeros(lead + (3,))
        for training in (True, False):
            y, new_state, aux = peer_ref.forward(cfg, params, state, x, training)
            assert y.shape == lead + (5,) and y.dtype == np.float64
            for name in aux:
                assert aux[name].shape == lead + (2, 2)
            for name in state:
                np.testing.assert_array_equal(new_state[name], state[name])
            grads, dx = peer_ref.vjp(cfg, params, state, x, np.zeros(lead + (5,)), training)
            assert dx.shape == x.shape
            assert all(not np.any(g) for g in grads.values())
