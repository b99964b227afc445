"""Meta-tests of the conformance suite's own helpers and strategies."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import peer_ref
from peer_conformance import helpers, strategies

Failed = pytest.fail.Exception


def test_assert_close_accepts_within_and_rejects_beyond_tolerance():
    expected = np.array([1.0, -2.0, 0.0])
    helpers.assert_close(expected + 1e-7, expected, rtol=1e-6, atol=1e-6, what="y")
    with pytest.raises(Failed, match=r"y\[1\]=-1.99, but should be -2.0"):
        helpers.assert_close(np.array([1.0, -1.99, 0.0]), expected, rtol=1e-6, atol=1e-6, what="y")


def test_assert_close_checks_shape_and_nan_positions():
    with pytest.raises(Failed, match=r"y.shape=\(2,\), but should be \(3,\)"):
        helpers.assert_close(np.zeros(2), np.zeros(3), rtol=1, atol=1, what="y")
    with pytest.raises(Failed, match="NaN"):
        helpers.assert_close(np.array([np.nan, 0.0]), np.zeros(2), rtol=1, atol=1, what="y")
    helpers.assert_close(np.array([np.nan, 0.0]), np.array([np.nan, 0.0]), rtol=0, atol=0, what="y")


def test_assert_close_matches_infinities_exactly():
    inf = np.inf
    helpers.assert_close(np.array([inf, -inf, 1.0]), np.array([inf, -inf, 1.0]), rtol=1e-6, atol=1e-6, what="y")
    with pytest.raises(Failed, match=r"y\[0\]=-inf, but should be inf"):
        helpers.assert_close(np.array([-inf, 0.0]), np.array([inf, 0.0]), rtol=1, atol=1, what="y")
    with pytest.raises(Failed, match=r"y\[0\]=1e\+300, but should be inf"):
        helpers.assert_close(np.array([1e300, 0.0]), np.array([inf, 0.0]), rtol=1, atol=1, what="y")
    with pytest.raises(Failed, match=r"y\[0\]=inf, but should be 1.0"):
        helpers.assert_close(np.array([inf, 0.0]), np.array([1.0, 0.0]), rtol=1, atol=1, what="y")


def _case(**cfg_fields):
    cfg = peer_ref.PEERConfig(d_model=4, n_experts=16, heads=1, topk=2, d_key=2, query_norm="none", **cfg_fields)
    params, state = peer_ref.init(cfg, seed=0)
    x = np.random.default_rng(0).standard_normal((3, 4))
    return strategies.Case(cfg, params, state, x, None, np.zeros((3, 4)), False, 0)


def test_valid_routing_accepts_the_reference_and_rejects_a_wrong_expert():
    case = _case()
    _, _, aux = peer_ref.forward(case.cfg, case.params, case.state, case.x)
    helpers.assert_valid_routing(case, "float64", aux["indices"])
    wrong = aux["indices"].copy()
    table = peer_ref.routing_scores(case.cfg, case.params, case.state, case.x)
    wrong[0, 0, 1] = int(np.argmin(table[0, 0]))
    with pytest.raises(Failed, match="should be a top-2"):
        helpers.assert_valid_routing(case, "float64", wrong)


def test_valid_routing_rejects_wrong_order_and_repeats():
    case = _case()
    _, _, aux = peer_ref.forward(case.cfg, case.params, case.state, case.x)
    with pytest.raises(Failed, match="descending score order"):
        helpers.assert_valid_routing(case, "float64", aux["indices"][..., ::-1])
    repeated = aux["indices"].copy()
    repeated[..., 1] = repeated[..., 0]
    with pytest.raises(Failed, match="repeats an expert"):
        helpers.assert_valid_routing(case, "float64", repeated)


def test_valid_routing_allows_swapping_a_near_tie_but_not_a_clear_gap():
    case = _case()
    params = dict(case.params)
    # Keys 0 and 1 of the right half differ by 1e-6: experts (l, 0) and (l, 1) nearly tie.
    params["keys.right"] = params["keys.right"].copy()
    params["keys.right"][0, 1] = params["keys.right"][0, 0] * (1 + 1e-6)
    case = case._replace(params=params)
    table = peer_ref.routing_scores(case.cfg, case.params, case.state, case.x)[:, 0]
    order = np.argsort(-table, axis=-1, kind="stable")
    _, _, aux = peer_ref.forward(case.cfg, case.params, case.state, case.x)
    for t in range(3):
        a, b = order[t, 0], order[t, 1]
        if abs(table[t, a] - table[t, b]) < 1e-5:
            swapped = aux["indices"].copy()
            swapped[t, 0, :2] = [b, a]
            helpers.assert_valid_routing(case, "float32", swapped)  # tolerance 1e-4: allowed
            with pytest.raises(Failed):
                helpers.assert_valid_routing(case, "float64", swapped)  # tolerance 1e-9: not allowed
            return
    pytest.fail("the constructed near tie did not reach the top-2 of any token")


@settings(max_examples=100)
@given(data=st.data())
def test_config_strategy_is_valid_and_sometimes_uses_defaults(data):
    cfg = data.draw(strategies.configs())
    assert isinstance(cfg, peer_ref.PEERConfig) and cfg.topk <= cfg.n_keys


def test_config_strategy_exercises_every_option_value():
    choices = {
        "activation": set(peer_ref.ACTIVATIONS),
        "score": set(peer_ref.SCORES),
        "query_norm": set(peer_ref.QUERY_NORMS),
        "shared_keys": {True, False},
        "query_bias": {True, False},
        "expert_bias": {True, False},
        "expert_glu": {True, False},
    }
    seen = {name: set() for name in choices}

    @settings(max_examples=300, database=None, derandomize=True)
    @given(strategies.configs())
    def collect(cfg):
        for name in choices:
            seen[name].add(getattr(cfg, name))

    collect()
    assert seen == choices


@settings(max_examples=50)
@given(case=strategies.tied_cases())
def test_tied_cases_really_tie(case):
    table = peer_ref.routing_scores(case.cfg, case.params, case.state, case.x)
    assert np.all(table == np.round(table)), "tied_cases must give integer scores"


def test_config_pool_covers_every_option_value():
    """The pooled configs (used for whole calls outside the thorough profile) still cover every option."""
    pools = strategies.POOL
    for name, values in {
        "activation": peer_ref.ACTIVATIONS,
        "score": peer_ref.SCORES,
        "query_norm": peer_ref.QUERY_NORMS,
        "shared_keys": (True, False),
        "query_bias": (True, False),
        "expert_bias": (True, False),
        "expert_glu": (True, False),
    }.items():
        assert {getattr(cfg, name) for cfg in pools} == set(values), name
    # Both expert kinds meet the batch norm and its absence, and GLU experts with and without bias.
    assert {(cfg.expert_glu, cfg.query_norm) for cfg in pools} == {
        (glu, norm) for glu in (True, False) for norm in peer_ref.QUERY_NORMS
    }
    assert {cfg.expert_bias for cfg in pools if cfg.expert_glu} == {True, False}
    assert any(cfg.d_out != cfg.d_model for cfg in pools)
    assert any(cfg.topk == cfg.n_keys for cfg in pools) and any(cfg.topk == 1 for cfg in pools)
    assert {cfg.bn_momentum for cfg in pools if cfg.query_norm == "batch"} >= {0.0, 0.1, 1.0}
