"""Product-key retrieval (SPEC §3.4–§3.8, §4): the two-stage search equals the brute-force top-k.

Exact ties are built from small integer-valued keys and queries, so that many experts share a
score and the lower-index rule decides the order.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import peer_ref
from peer_ref.routing import topk_lower_index


@st.composite
def routing_case(draw, integer_valued: bool):
    n_keys = draw(st.integers(1, 6))
    cfg = peer_ref.PEERConfig(
        d_model=2,
        n_experts=n_keys * n_keys,
        heads=draw(st.integers(1, 3)),
        topk=draw(st.integers(1, n_keys)),
        d_key=2 * draw(st.integers(1, 3)),
        shared_keys=draw(st.booleans()),
    )
    tokens = draw(st.integers(0, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if integer_valued:
        # Values in {-1, 0, 1}: sums are exact in float64 and ties are everywhere.
        def sample(shape):
            return rng.integers(-1, 2, size=shape).astype(np.float64)
    else:
        sample = rng.standard_normal
    params = {
        "keys.left": sample((cfg.key_sets, n_keys, cfg.d_half)),
        "keys.right": sample((cfg.key_sets, n_keys, cfg.d_half)),
    }
    queries = sample((tokens, cfg.heads, cfg.d_key))
    return cfg, params, queries


def _check_against_brute_force(cfg, params, queries):
    s_left, s_right = peer_ref.sub_key_scores(cfg, params, queries)
    got = peer_ref.product_key_topk(cfg, s_left, s_right)
    want = peer_ref.brute_force_topk(cfg, s_left, s_right)
    assert got.shape == (queries.shape[0], cfg.heads, cfg.topk)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, want, err_msg=f"product-key top-k differs from brute force [{cfg}]")


@settings(max_examples=150, deadline=None)
@given(routing_case(integer_valued=False))
def test_product_key_equals_brute_force_random(case):
    _check_against_brute_force(*case)


@settings(max_examples=150, deadline=None)
@given(routing_case(integer_valued=True))
def test_product_key_equals_brute_force_exact_ties(case):
    _check_against_brute_force(*case)


def test_all_scores_tied_selects_lowest_expert_indices():
    cfg = peer_ref.PEERConfig(d_model=2, n_experts=16, heads=2, topk=3, d_key=2, shared_keys=False)
    s_left = np.zeros((1, 2, 4))
    s_right = np.zeros((1, 2, 4))
    got = peer_ref.product_key_topk(cfg, s_left, s_right)
    # Stage one keeps sub-keys 0,1,2 on each side; among their 9 equal sums the lowest
    # expert indices are 0 (0,0), 1 (0,1), 2 (0,2).
    np.testing.assert_array_equal(got, [[[0, 1, 2], [0, 1, 2]]])


def test_order_is_score_descending_then_lower_index():
    cfg = peer_ref.PEERConfig(d_model=2, n_experts=9, heads=1, topk=3, d_key=2)
    s_left = np.array([[[1.0, 2.0, 2.0]]])
    s_right = np.array([[[0.0, 1.0, 0.0]]])
    # Full scores: expert 4 (1,1) = 3, expert 7 (2,1) = 3, then 2 for experts 1, 3, 5, 6, 8.
    got = peer_ref.product_key_topk(cfg, s_left, s_right)
    np.testing.assert_array_equal(got, [[[4, 7, 1]]])
    np.testing.assert_array_equal(peer_ref.brute_force_topk(cfg, s_left, s_right), got)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-2, 2), min_size=1, max_size=12), st.data())
def test_topk_lower_index_is_a_stable_descending_sort(values, data):
    k = data.draw(st.integers(1, len(values)))
    values = np.array(values, dtype=np.float64)
    top, pos = topk_lower_index(values, np.arange(values.size), k)
    want = sorted(range(values.size), key=lambda i: (-values[i], i))[:k]
    np.testing.assert_array_equal(pos, want)
    np.testing.assert_array_equal(top, values[want])


def test_shared_keys_give_every_head_key_set_zero():
    cfg = peer_ref.PEERConfig(d_model=2, n_experts=9, heads=3, topk=2, d_key=4, shared_keys=True)
    rng = np.random.default_rng(1)
    params = {"keys.left": rng.standard_normal((1, 3, 2)), "keys.right": rng.standard_normal((1, 3, 2))}
    queries = rng.standard_normal((2, 3, 4))
    s_left, s_right = peer_ref.sub_key_scores(cfg, params, queries)
    np.testing.assert_allclose(s_left, np.einsum("thd,nd->thn", queries[..., :2], params["keys.left"][0]))
    np.testing.assert_allclose(s_right, np.einsum("thd,nd->thn", queries[..., 2:], params["keys.right"][0]))


def test_pruned_candidates_are_the_pairs_the_lemma_keeps():
    for k in range(1, 40):
        a, b = peer_ref.routing.pruned_candidates(k)
        pairs = set(zip(a.tolist(), b.tolist()))
        assert len(pairs) == a.size, f"k={k}: a pair repeats"
        assert all(0 <= x < k and 0 <= y < k for x, y in pairs), f"k={k}: a rank outside [0, {k})"
        assert {(x, y) for x in range(k) for y in range(k) if (x + 1) * (y + 1) <= k} <= pairs
        assert {(x, k // (x + 1)) for x in range(1, k)} <= pairs
    assert peer_ref.routing.pruned_candidates(16)[0].size == 50 + 15
    with pytest.raises(ValueError, match="k is 0"):
        peer_ref.routing.pruned_candidates(0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pruned_candidates_decide_every_row_whose_k_plus_1_best_are_distinct(dtype):
    """The lemma of peer_ref.routing.pruned_candidates: where the k+1 best kept sums are
    distinct (and stage one is finite), the k best kept pairs are the k best of all k*k under the
    full order, in order; coarse values (many ties, so rows the lemma leaves open) and wide
    ranges (float rounding makes unequal values sum equal) are both drawn."""
    rng = np.random.default_rng(11)
    decided = 0
    for k in (2, 3, 4, 5, 8, 16):
        a, b = peer_ref.routing.pruned_candidates(k)
        n = 3 * k
        for scale in ("coarse", "normal", "wide"):
            values = rng.standard_normal((400, 2, n))
            if scale == "coarse":
                values = np.round(values * 2)
            elif scale == "wide":
                values = values * 10.0 ** rng.integers(-8, 9, (400, 2, 1))
            values = values.astype(dtype)
            index = np.broadcast_to(np.arange(n), values.shape[:-1] + (n,))
            top, pos = topk_lower_index(values, index, k)  # (rows, 2, k)
            sums = top[:, 0, :, None] + top[:, 1, None, :]
            experts = pos[:, 0, :, None] * n + pos[:, 1, None, :]
            full = np.take_along_axis(
                experts.reshape(-1, k * k),
                topk_lower_index(sums.reshape(-1, k * k), experts.reshape(-1, k * k), k)[1],
                -1,
            )
            kept = sums[:, a, b]
            best, chosen = topk_lower_index(kept, np.broadcast_to(np.arange(a.size), kept.shape), min(k + 1, a.size))
            distinct = (best[:, 1:] != best[:, :-1]).all(-1)
            pruned = experts[np.arange(len(kept))[:, None], a[chosen[:, :k]], b[chosen[:, :k]]]
            np.testing.assert_array_equal(pruned[distinct], full[distinct], err_msg=f"k={k}, {scale}")
            decided += distinct.sum()
    assert decided > 1000  # the lemma decides most rows, so the check above is not vacuous
