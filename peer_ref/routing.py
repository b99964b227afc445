"""Product-key retrieval (SPEC §3.4–§3.8, §4) and its brute-force oracle.

Order rule (SPEC §4): experts are returned by score descending; an exact tie
goes to the lower index — the sub-key index in stage one, the expert index
(left * n_keys + right) in stage two. Under this total order the product-key
search is exact: the top-k over all n_experts sums lies among the k*k candidates.
"""

from __future__ import annotations

import numpy as np

from .config import PEERConfig


def topk_lower_index(values: np.ndarray, index: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k along the last axis by (value descending, index ascending).

    ``index`` gives each entry's index for tie-breaking (same shape as values).
    Returns (top values, positions into the last axis), each (..., k).
    """
    # lexsort sorts by the last key first: primarily -value, then index.
    order = np.lexsort((index, -values), axis=-1)[..., :k]
    return np.take_along_axis(values, order, axis=-1), order


def sub_key_scores(cfg: PEERConfig, params: dict, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores of each query half against its sub-keys: two (T, heads, n_keys) arrays."""
    q_left = queries[..., : cfg.d_half]
    q_right = queries[..., cfg.d_half :]
    keys_left = _keys_per_head(cfg, params["keys.left"])
    keys_right = _keys_per_head(cfg, params["keys.right"])
    s_left = np.einsum("thd,hnd->thn", q_left, keys_left)
    s_right = np.einsum("thd,hnd->thn", q_right, keys_right)
    return s_left, s_right


def _keys_per_head(cfg: PEERConfig, keys: np.ndarray) -> np.ndarray:
    # Shared keys: every head reads key set 0 (SPEC §3.5).
    return np.broadcast_to(keys, (cfg.heads,) + keys.shape[1:]) if cfg.shared_keys else keys


def product_key_topk(cfg: PEERConfig, s_left: np.ndarray, s_right: np.ndarray) -> np.ndarray:
    """Expert indices (T, heads, topk) selected by two-stage product-key search."""
    k, n = cfg.topk, cfg.n_keys
    sub_index = np.broadcast_to(np.arange(n), s_left.shape)
    top_left, pos_left = topk_lower_index(s_left, sub_index, k)
    top_right, pos_right = topk_lower_index(s_right, sub_index, k)
    sums = top_left[..., :, None] + top_right[..., None, :]  # (T, h, k, k)
    experts = pos_left[..., :, None] * n + pos_right[..., None, :]
    lead = sums.shape[:-2]
    sums = sums.reshape(lead + (k * k,))
    experts = experts.reshape(lead + (k * k,))
    _, pos = topk_lower_index(sums, experts, k)
    return np.take_along_axis(experts, pos, axis=-1).astype(np.int64)


def pruned_candidates(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Stage-two candidates worth scoring: ranks (a, b) into the two stage-one lists, each list
    sorted by value descending. Two int64 arrays of equal length, about k ln k + k of the k*k.

    Not a rule of PEER but a lemma about its search, for backends that score fewer candidates.
    Every candidate (a', b') with a' <= a and b' <= b scores at least as much as (a, b), float
    addition being monotone while every stage-one value is finite, so a pair with
    (a+1)(b+1) > k has k others scoring at least as much. Kept are the pairs with
    (a+1)(b+1) <= k, and the first dropped pair of each row a, (a, k // (a+1)), which scores at
    least as much as the rest of its row. If the k+1 best kept sums are distinct, the k-th
    beats every dropped pair strictly (a dropped pair among the top k would need k kept pairs
    at least as good: a tie), so the k best kept pairs are the k best of all k*k, in the same
    order. A row with a tie there, or a non-finite stage-one value, needs the full search.
    Pairs come a-major, b ascending: row a's kept ranks are the prefix b <= k // (a+1).
    """
    if k < 1:
        raise ValueError(f"k is {k}, but expected a positive number of experts per head")
    # Row a keeps b < k // (a+1) and its first dropped pair, b = k // (a+1): a prefix of the row.
    pairs = [(a, b) for a in range(k) for b in range(min(k, k // (a + 1) + 1))]
    a, b = np.array(pairs, dtype=np.int64).T
    return a, b


def expert_scores(cfg: PEERConfig, s_left: np.ndarray, s_right: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Raw score of each selected expert: s_left[left] + s_right[right] (SPEC §3.7)."""
    left = indices // cfg.n_keys
    right = indices % cfg.n_keys
    return np.take_along_axis(s_left, left, axis=-1) + np.take_along_axis(s_right, right, axis=-1)


def brute_force_topk(cfg: PEERConfig, s_left: np.ndarray, s_right: np.ndarray) -> np.ndarray:
    """Test oracle: score all n_experts and take the top-k under the same order rule."""
    full = (s_left[..., :, None] + s_right[..., None, :]).reshape(s_left.shape[:-1] + (cfg.n_experts,))
    index = np.broadcast_to(np.arange(cfg.n_experts), full.shape)
    _, pos = topk_lower_index(full, index, cfg.topk)
    return pos.astype(np.int64)
