"""Expert usage and unevenness (SPEC §11) on hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

import peer_ref
from peer_ref import metrics

CFG = peer_ref.PEERConfig(d_model=2, n_experts=4, heads=1, topk=1, d_key=2)


def test_uniform_usage_is_one_and_unevenness_zero():
    totals = metrics.accumulate(CFG, np.array([[[0]], [[1]], [[2]], [[3]]]), np.full((4, 1, 1), 0.5))
    np.testing.assert_array_equal(totals, [0.5, 0.5, 0.5, 0.5])
    assert metrics.usage(totals) == 1.0
    assert metrics.unevenness(totals) == pytest.approx(0.0, abs=1e-15)


def test_one_expert_has_usage_one_over_n_and_unevenness_log_n():
    totals = metrics.accumulate(CFG, np.full((3, 1, 1), 2), np.ones((3, 1, 1)))
    assert metrics.usage(totals) == 0.25
    assert metrics.unevenness(totals) == pytest.approx(math.log(4), rel=1e-15)


def test_hand_computed_partial_usage():
    # Weights 3 on expert 0 and 1 on expert 1: z = (3/4, 1/4, 0, 0).
    indices = np.array([[[0]], [[0]], [[1]]])
    weights = np.array([[[2.0]], [[1.0]], [[-1.0]]])  # magnitudes: score="none" can be negative
    totals = metrics.accumulate(CFG, indices, weights)
    np.testing.assert_array_equal(totals, [3.0, 1.0, 0.0, 0.0])
    assert metrics.usage(totals) == 0.5
    want = math.log(4) + 0.75 * math.log(0.75) + 0.25 * math.log(0.25)
    assert metrics.unevenness(totals) == pytest.approx(want, rel=1e-14)


def test_masked_tokens_are_excluded_and_totals_accumulate():
    cfg = peer_ref.PEERConfig(d_model=2, n_experts=9, heads=2, topk=2, d_key=2)
    indices = np.array([[[[0, 1], [2, 3]], [[4, 5], [6, 7]]]])  # (1, 2 tokens, heads, topk)
    weights = np.full((1, 2, 2, 2), 0.25)
    mask = np.array([[True, False]])
    totals = metrics.accumulate(cfg, indices, weights, mask)
    np.testing.assert_array_equal(totals, [0.25, 0.25, 0.25, 0.25, 0, 0, 0, 0, 0])
    same = metrics.accumulate(cfg, indices, weights, mask, into=totals)
    assert same is totals
    np.testing.assert_array_equal(totals, [0.5, 0.5, 0.5, 0.5, 0, 0, 0, 0, 0])
    assert metrics.usage(totals) == pytest.approx(4 / 9)


def test_accumulates_repeated_experts_within_a_token():
    cfg = peer_ref.PEERConfig(d_model=2, n_experts=4, heads=3, topk=1, d_key=2)
    totals = metrics.accumulate(cfg, np.array([[[1], [1], [1]]]), np.array([[[0.5], [0.25], [0.25]]]))
    np.testing.assert_array_equal(totals, [0, 1.0, 0, 0])


def test_forward_aux_feeds_accumulate():
    cfg = peer_ref.PEERConfig(d_model=4, n_experts=16, heads=2, topk=3, d_key=4)
    params, state = peer_ref.init(cfg, seed=0)
    x = np.random.default_rng(0).standard_normal((3, 7, 4))
    _, _, aux = peer_ref.forward(cfg, params, state, x)
    totals = metrics.accumulate(cfg, aux["indices"], aux["weights"])
    # Softmax weights sum to 1 per token and head.
    assert totals.sum() == pytest.approx(3 * 7 * 2)
    assert 0 < metrics.usage(totals) <= 1 and 0 <= metrics.unevenness(totals) <= math.log(16)


def test_errors():
    with pytest.raises(peer_ref.PEERInputError, match=r"totals sum to 0, but expected at least one routed token"):
        metrics.usage(np.zeros(4))
    with pytest.raises(peer_ref.PEERInputError, match=r"totals sum to 0"):
        metrics.unevenness(metrics.accumulate(CFG, np.zeros((2, 1, 1), int), np.ones((2, 1, 1)), np.zeros(2, bool)))
    with pytest.raises(peer_ref.PEERInputError, match=r"indices.shape=\(2, 1, 1\) and weights.shape=\(2, 1, 2\)"):
        metrics.accumulate(CFG, np.zeros((2, 1, 1), int), np.ones((2, 1, 2)))
    with pytest.raises(peer_ref.PEERInputError, match=r"expected equal shapes \(\.\.\., heads=1, topk=1\)"):
        metrics.accumulate(CFG, np.zeros((2, 2, 1), int), np.ones((2, 2, 1)))
    with pytest.raises(peer_ref.PEERInputError, match=r"mask.shape=\(3,\), but expected \(2,\)"):
        metrics.accumulate(CFG, np.zeros((2, 1, 1), int), np.ones((2, 1, 1)), np.ones(3, bool))
    with pytest.raises(peer_ref.PEERInputError, match=r"into.shape=\(5,\), but expected \(4,\)"):
        metrics.accumulate(CFG, np.zeros((2, 1, 1), int), np.ones((2, 1, 1)), into=np.zeros(5))


def test_masked_nan_weights_are_excluded():
    weights = np.array([[[1.0]], [[np.nan]]])
    totals = metrics.accumulate(CFG, np.array([[[0]], [[1]]]), weights, np.array([True, False]))
    np.testing.assert_array_equal(totals, [1.0, 0, 0, 0])
