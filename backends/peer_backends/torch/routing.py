"""Routing (SPEC §3.4-§3.9, §4): queries, sub-key scores, product-key top-k with its tie and
NaN order, the selected experts' scores and the router weights.

The routing kernels are custom operators (namespace "peer"): opaque to torch.compile, which calls
the same kernels as eager mode, with a fake (meta) implementation for tracing with symbolic token
counts and a registered autograd formula. Data-dependent work (tie repair) stays inside them, so
a compiled graph never breaks.
"""

import functools

import numpy as np
import torch
import torch.nn.functional as F

from peer_ref import checks
from peer_ref.routing import pruned_candidates

from .core import transformed
from .query_norm import query_norm


def _order_key(values, index, bound):
    """int64 keys whose descending order is (value descending, index ascending), with no ties.

    A float32's bits, with the magnitude bits of negatives flipped, compare as integers like the
    floats do; NaN takes the lowest key, below -inf (SPEC §4.1); bound - 1 - index (index < bound
    <= 46340**2 < 2**31, SPEC §1) fills the low 32 bits. Adding 0.0 turns -0.0 into +0.0 so the
    two tie, as they do as floats.
    """
    bits = (values + 0.0).view(torch.int32)
    monotone = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    monotone = torch.where(values.isnan(), torch.iinfo(torch.int32).min, monotone).to(torch.int64)
    return monotone * (1 << 32) + (bound - 1 - index)


def _nan_last(values):
    """The values with NaN as -inf: torch.topk ranks NaN first, SPEC §4.1 last. A NaN then ties
    with a real -inf, which the callers' tie detection sends to the full order."""
    return torch.where(values.isnan(), -torch.inf, values)


def _ordered_positions(values, index, bound, k):
    """Positions along the last axis of the top k by (value descending, index ascending)."""
    if values.dtype == torch.float32:
        return torch.topk(_order_key(values, index, bound), k, dim=-1).indices
    # float64 has no spare bits for a composite key: stable sorts from the least significant key,
    # by index, then by value descending, then NaN after every number.
    order = torch.argsort(index, dim=-1)
    order = order.gather(
        -1, torch.sort(_nan_last(values.gather(-1, order)), dim=-1, descending=True, stable=True).indices
    )
    order = order.gather(-1, torch.sort(values.gather(-1, order).isnan().to(torch.uint8), dim=-1, stable=True).indices)
    return order[..., :k]


def _top_positions(values, index, bound, k):
    """(values, positions) of the top k along the last axis, like _ordered_positions.

    Via a plain top-(k+1): a row whose k+1 best values are all distinct has one top k in one
    order, whatever torch.topk does with ties; only rows with an exact tie among them are
    redone under the full order.
    """
    ranked, positions = torch.topk(_nan_last(values), min(k + 1, values.shape[-1]), dim=-1)
    tied = (ranked[..., 1:] == ranked[..., :-1]).any(-1)
    positions = positions[..., :k]
    top = values.gather(-1, positions)
    if tied.any():
        rows = tied.nonzero(as_tuple=True)
        positions[rows] = _ordered_positions(values[rows], index[rows], bound, k)
        top[rows] = values[rows].gather(-1, positions[rows])
    return top, positions


# The routing and expert kernels below are custom operators (namespace "peer"): opaque to
# torch.compile, which calls the same kernels as eager mode, with a fake (meta) implementation
# for tracing with symbolic token counts and a registered autograd formula. Data-dependent
# work (tie repair, grouping by expert) stays inside them, so a compiled graph never breaks.


def _sub_key_scores(cfg, params, queries, plain=False):
    """(2, T, heads, n_keys) scores of each query half (left, right) against its sub-keys.

    Called without autograd (selected_scores carries the gradient of the selected scores), or
    ``plain``, under a torch.func transform, with it: one einsum.
    """
    halves = queries.unflatten(-1, (2, cfg.d_half))  # (T, heads, 2, d_half)
    keys = torch.stack((params["keys.left"], params["keys.right"]))  # (2, key_sets, n_keys, d_half)
    if not cfg.shared_keys:
        return torch.einsum("thsd,shnd->sthn", halves, keys)
    if plain or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return torch.einsum("thsd,snd->sthn", halves, keys[:, 0])
    # Eagerly without autograd, two plain matrix products read the strided halves in place.
    out = queries.new_empty((2,) + queries.shape[:-1] + (cfg.n_keys,))
    for side in range(2):
        torch.mm(halves[:, :, side].reshape(-1, cfg.d_half), keys[side, 0].T, out=out[side].view(-1, cfg.n_keys))
    return out


# Elements of one chunk of the dense (tokens, heads, n_keys) sub-key gradient: 4 MiB in float32,
# one buffer shared by both halves. Small enough to stay in the last-level cache and to spare the
# page faults of a fresh large buffer, large enough to need few chunks: on a loaded machine each
# parallel op can cost a scheduler time slice.
KEY_GRAD_ELEMENTS = 1 << 20


@torch.library.custom_op("peer::selected_scores", mutates_args=())
def _selected_scores_op(
    queries: torch.Tensor,
    keys_left: torch.Tensor,
    keys_right: torch.Tensor,
    halves: torch.Tensor,
    sub_scores: torch.Tensor,
) -> torch.Tensor:
    """(T, heads, k) scores of the selected experts, read from the (2, T, heads, n_keys) sub-key scores."""
    return sub_scores.gather(-1, halves).sum(0)


@_selected_scores_op.register_fake
def _(queries, keys_left, keys_right, halves, sub_scores):
    return sub_scores.new_empty(halves.shape[1:])


@torch.library.custom_op("peer::selected_scores_backward", mutates_args=())
def _selected_scores_backward_op(
    d_scores: torch.Tensor,
    queries: torch.Tensor,
    keys_left: torch.Tensor,
    keys_right: torch.Tensor,
    halves: torch.Tensor,
    need_queries: bool,
    need_left: bool,
    need_right: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (queries, keys.left, keys.right) of the selected scores; an unneeded one is empty.

    Only k of each half's n_keys scores per head carry gradient, so the dense (T, heads, n_keys)
    gradient is never formed: the query halves get bags of their selected sub-key rows, and
    the sub-keys get the dense products one cache-sized token chunk at a time.
    """
    tokens, heads, k = d_scores.shape
    key_sets, n, d_half = keys_left.shape
    # One key set per head: the selected rows of the (heads * n_keys, d_half) table.
    rows = halves if key_sets == 1 else halves + torch.arange(heads, device=halves.device)[:, None] * n
    weights = d_scores.reshape(tokens * heads, k).contiguous()
    d_queries = []
    d_keys = []
    step = max(1, KEY_GRAD_ELEMENTS // (heads * n))
    dense = d_scores.new_empty((min(step, tokens), heads, n))
    for side, (keys, needed) in enumerate(((keys_left, need_left), (keys_right, need_right))):
        if need_queries:
            d_queries.append(
                F.embedding_bag(
                    rows[side].reshape(tokens * heads, k),
                    keys.reshape(-1, d_half),
                    per_sample_weights=weights,
                    mode="sum",
                )
            )
        if not needed:
            d_keys.append(keys.new_empty(0))
            continue
        half = queries[..., side * d_half : (side + 1) * d_half]  # (T, heads, d_half), strided
        d_table = keys.new_zeros(keys.shape)
        for start in range(0, tokens, step):
            chunk = slice(start, start + step)
            dense_chunk = dense[: half[chunk].shape[0]].zero_()
            dense_chunk.scatter_add_(-1, halves[side, chunk], d_scores[chunk])
            if key_sets == 1:
                d_table[0].addmm_(dense_chunk.reshape(-1, n).T, half[chunk].reshape(-1, d_half))
            else:
                d_table.baddbmm_(dense_chunk.permute(1, 2, 0), half[chunk].transpose(0, 1))
        d_keys.append(d_table)
    if need_queries:
        d_queries = torch.stack(d_queries, dim=1).view(queries.shape)
    else:
        d_queries = queries.new_empty(0)
    return d_queries, d_keys[0], d_keys[1]


@_selected_scores_backward_op.register_fake
def _(d_scores, queries, keys_left, keys_right, halves, need_queries, need_left, need_right):
    def like(t, needed):
        return t.new_empty(t.shape if needed else (0,))

    return like(queries, need_queries), like(keys_left, need_left), like(keys_right, need_right)


def _selected_scores_setup(ctx, inputs, output):
    queries, keys_left, keys_right, halves, _ = inputs
    ctx.save_for_backward(queries, keys_left, keys_right, halves)


def _selected_scores_backward(ctx, d_scores):
    queries, keys_left, keys_right, halves = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    grads = torch.ops.peer.selected_scores_backward(d_scores, queries, keys_left, keys_right, halves, *need)
    return tuple(g if n else None for g, n in zip(grads, need)) + (None, None)


_selected_scores_op.register_autograd(_selected_scores_backward, setup_context=_selected_scores_setup)


def selected_scores(queries, keys_left, keys_right, halves, sub_scores):
    """scores[t, j, i] = left[t, j] . keys.left[g, a] + right[t, j] . keys.right[g, b] for each
    selected expert i = a*n_keys + b (halves = (a, b)), read from the sub-key scores; the
    gradient flows to queries and sub-keys (not to sub_scores). The op peer::selected_scores.
    """
    return torch.ops.peer.selected_scores(queries, keys_left, keys_right, halves, sub_scores)


@functools.cache
def _candidate_pairs(k, device):
    """(2, C) ranks (a, b) of the stage-two candidates that can matter: see
    ``peer_ref.routing.pruned_candidates``, the lemma and its conditions (finite stage-one
    values; the k+1 best kept sums distinct). Rows outside them are redone over all k*k pairs."""
    return torch.tensor(np.stack(pruned_candidates(k)), device=device)


def _all_pairs_topk(k, n, top, positions):
    """The k best of all k*k candidates under the full order, for rows of (2, R, k) lists."""
    sums = (top[0, :, :, None] + top[1, :, None, :]).flatten(-2)
    experts = (positions[0, :, :, None] * n + positions[1, :, None, :]).flatten(-2)
    return experts.gather(-1, _ordered_positions(sums, experts, n * n, k))


@torch.library.custom_op("peer::product_key_topk", mutates_args=())
def _product_key_topk_op(sub_scores: torch.Tensor, topk: int) -> torch.Tensor:
    """int64 expert indices (T, heads, topk) from the (2, T, heads, n_keys) sub-key scores."""
    k, n = topk, sub_scores.shape[-1]
    sub_index = torch.arange(n, device=sub_scores.device).expand(sub_scores.shape)
    top, positions = _top_positions(sub_scores, sub_index, n, k)  # both halves in one call
    a, b = _candidate_pairs(k, top.device)
    # All k*k sums are one cheap broadcast add; selecting from them beats two strided selects.
    sums = (top[0, ..., :, None] + top[1, ..., None, :]).flatten(-2).index_select(-1, a * k + b)
    best, chosen = torch.topk(_nan_last(sums), min(k + 1, sums.shape[-1]), dim=-1)
    # The pruning needs monotone sums: rows with a non-finite score (where inf - inf is NaN) are
    # redone over all pairs, like rows with a tie.
    tied = (best[..., 1:] == best[..., :-1]).any(-1) | ~top.isfinite().all(-1).all(0)
    chosen = chosen[..., :k]
    experts = positions[0].gather(-1, a.take(chosen)) * n + positions[1].gather(-1, b.take(chosen))
    if tied.any():
        rows = tied.nonzero(as_tuple=True)
        experts[rows] = _all_pairs_topk(k, n, top[(slice(None),) + rows], positions[(slice(None),) + rows])
    return experts


@_product_key_topk_op.register_fake
def _(sub_scores, topk):
    return sub_scores.new_empty(sub_scores.shape[1:-1] + (topk,), dtype=torch.int64)


@_product_key_topk_op.register_vmap
def _(info, in_dims, sub_scores, topk):
    # The batch dimension joins the token dimension: every token is searched on its own.
    batched = sub_scores.movedim(in_dims[0], 1) if in_dims[0] is not None else sub_scores[:, None]
    size = batched.shape[1]
    experts = torch.ops.peer.product_key_topk(batched.flatten(1, 2), topk)
    return experts.unflatten(0, (size, -1)), 0


def _product_key_topk(cfg, sub_scores):
    """Expert indices (T, heads, topk) from the (2, T, heads, n_keys) sub-key scores (SPEC §3.6-§3.8),
    ties by (score descending, index ascending); the op peer::product_key_topk, without gradient."""
    return torch.ops.peer.product_key_topk(sub_scores.detach(), cfg.topk)


@torch.library.custom_op("peer::checked_routing", mutates_args=())
def _checked_routing_op(routing: torch.Tensor, n_experts: int) -> torch.Tensor:
    """The routing override as int64, after checking its values (SPEC §9) where they are known."""
    if routing.numel():
        checks.check_expert_indices(n_experts, int(routing.min()), int(routing.max()))
    return routing.to(torch.int64, copy=True)


@_checked_routing_op.register_fake
def _(routing, n_experts):
    return routing.new_empty(routing.shape, dtype=torch.int64)


@_checked_routing_op.register_vmap
def _(info, in_dims, routing, n_experts):
    return torch.ops.peer.checked_routing(routing, n_experts), in_dims[0]  # elementwise


def _score_weights(name, scores):
    if name == "softmax":
        return torch.softmax(scores, dim=-1)
    if name == "sigmoid":
        return torch.sigmoid(scores)
    return scores


def route(cfg, training, p, state, xf, valid, routing):
    """Query, batch norm, product-key top-k and router weights (SPEC §3.2-§3.9, §4).

    p: parameters in the compute dtype; xf (T, d_model), masked tokens already zeroed; valid (T,)
    bool or None; routing (..., heads, topk) or None. Returns (new_state, indices, scores,
    weights), the last three (T, heads, topk); scores carry the gradient of the selected sub-keys.
    """
    tokens = xf.shape[0]
    q = xf @ p["query.kernel"]
    if cfg.query_bias:
        q = q + p["query.bias"]
    q, new_state = query_norm(cfg, p, state, q, valid, training)
    queries = q.reshape(tokens, cfg.heads, cfg.d_key)
    n = cfg.n_keys
    if transformed():
        # Under torch.func: the same scores, differentiated through a dense einsum and a gather.
        sub_scores = _sub_key_scores(cfg, p, queries, plain=True)
        if routing is None:
            indices = _product_key_topk(cfg, sub_scores)
        else:
            indices = torch.ops.peer.checked_routing(routing.reshape(tokens, cfg.heads, cfg.topk), cfg.n_experts)
        scores = sub_scores.gather(-1, torch.stack((indices // n, indices % n))).sum(0)
        return new_state, indices, scores, _score_weights(cfg.score, scores)
    with torch.no_grad():  # selected_scores carries the gradient of the selected scores
        sub_scores = _sub_key_scores(cfg, p, queries)
        if routing is None:
            indices = _product_key_topk(cfg, sub_scores)
        else:
            indices = torch.ops.peer.checked_routing(routing.reshape(tokens, cfg.heads, cfg.topk), cfg.n_experts)
    halves = torch.stack((indices // n, indices % n))
    scores = selected_scores(queries, p["keys.left"], p["keys.right"], halves, sub_scores)
    return new_state, indices, scores, _score_weights(cfg.score, scores)
