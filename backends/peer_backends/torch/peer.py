import functools
import typing

import numpy as np
import torch
import torch.nn.functional as F

import peer_ref
from peer_ref import checks
from peer_ref.errors import PEERInputError

from .._implementation import choose
from . import kernels
from .core import dtype_name, torch_dtype

# Kernels of the expert stage, the default first: "aten" is PyTorch's own (embedding-bag) kernels,
# "triton" the fused Triton kernels of peer_backends.torch.kernels.
IMPLEMENTATIONS = ("aten", "triton")


def implementation_for(implementation, device) -> str:
    """The implementation to run for tensors on ``device`` (see peer_backends._implementation).

    "triton" can run where triton is installed, on CUDA devices, or on CPU in Triton's interpreter
    (TRITON_INTERPRET=1); None picks it on CUDA devices, "aten" elsewhere.
    """
    device = torch.device(device)
    options = {"aten": None, "triton": kernels.unavailable_reason(device)}
    preferred = ["triton", "aten"] if device.type == "cuda" else ["aten"]
    return choose("torch", implementation, options, preferred)


def init(cfg, seed=0, dtype=None, device=None):
    dtype = checks.check_dtype_name(dtype or "float32")
    generator = torch.Generator().manual_seed(seed)
    # bfloat16 and float16 parameters are drawn in float32 and rounded once.
    draw = torch.float64 if dtype == "float64" else torch.float32
    stds, constants = peer_ref.init_std(cfg), peer_ref.init_constant(cfg)
    params = {}
    for name, shape in cfg.param_shapes().items():
        if name in stds:
            value = torch.randn(shape, generator=generator, dtype=draw) * stds[name]
        else:
            value = torch.full(shape, constants[name], dtype=draw)
        params[name] = value.to(device=device, dtype=torch_dtype(dtype))
    s_dtype = torch_dtype(checks.state_dtype(dtype))
    state = {name: torch.full(shape, constants[name], dtype=s_dtype, device=device)
             for name, shape in cfg.state_shapes().items()}
    return params, state


def _meta(value):
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), dtype_name(value)
    array = np.asarray(value)
    return array.shape, array.dtype.name


def compute_dtype_name(compute_dtype):
    """``compute_dtype`` as a dtype name: a torch.dtype converts, anything else is checked as given."""
    return str(compute_dtype).removeprefix("torch.") if isinstance(compute_dtype, torch.dtype) else compute_dtype


def low_dtype(params, compute_dtype):
    """The mixed mode's low dtype name for validated params, or None (SPEC §10.3)."""
    return checks.check_compute_dtype(dtype_name(params["query.kernel"]), compute_dtype_name(compute_dtype))


def validate(cfg, params, state, x, training, mask=None, routing=None, dy=None,
             compute_dtype=None) -> tuple[int, ...]:
    """Check every argument through peer_ref.checks (SPEC §9); returns the leading shape of x.

    Under torch.compile the routing values are checked where they are known, when the graph runs
    (peer::checked_routing in forward_tensors), so that reading them does not break the graph.
    """
    for arg, value in (("params", params), ("state", state)):
        if not isinstance(value, dict):
            raise PEERInputError(f"{arg} is {type(value).__name__}, but expected a dict of arrays")
    dtype = checks.check_params_state(
        cfg, {k: _meta(v) for k, v in params.items()}, {k: _meta(v) for k, v in state.items()})
    for arg, tree in (("params", params), ("state", state)):
        for key, value in tree.items():
            if not isinstance(value, torch.Tensor):
                raise PEERInputError(f"{arg}[{key!r}] is {type(value).__name__}, but expected a torch.Tensor")
    for arg, value in (("x", x), ("mask", mask), ("routing", routing), ("dy", dy)):
        if value is not None and not isinstance(value, torch.Tensor):
            raise PEERInputError(f"{arg} is {type(value).__name__}, but expected a torch.Tensor")
    low = checks.check_compute_dtype(dtype, compute_dtype_name(compute_dtype))
    meta = lambda v: None if v is None else _meta(v)  # noqa: E731
    lead = checks.check_call(cfg, dtype, _meta(x), training, meta(mask), meta(routing), meta(dy), compute_dtype=low)
    if routing is not None and routing.numel() and not torch.compiler.is_compiling():
        checks.check_routing_values(cfg, int(routing.min()), int(routing.max()))
    return lead


# ---------------------------------------------------------------- routing (SPEC §3.4–§3.8, §4)

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
    order = order.gather(-1, torch.sort(_nan_last(values.gather(-1, order)), dim=-1, descending=True,
                                        stable=True).indices)
    order = order.gather(-1, torch.sort(values.gather(-1, order).isnan().to(torch.uint8), dim=-1,
                                        stable=True).indices)
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

def _sub_key_scores(cfg, params, queries):
    """(2, T, heads, n_keys) scores of each query half (left, right) against its sub-keys.

    Called without autograd: _SelectedScores carries the gradient of the selected scores.
    """
    halves = queries.unflatten(-1, (2, cfg.d_half))  # (T, heads, 2, d_half)
    keys = torch.stack((params["keys.left"], params["keys.right"]))  # (2, key_sets, n_keys, d_half)
    if not cfg.shared_keys:
        return torch.einsum("thsd,shnd->sthn", halves, keys)
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
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
def _selected_scores_op(queries: torch.Tensor, keys_left: torch.Tensor, keys_right: torch.Tensor,
                        halves: torch.Tensor, sub_scores: torch.Tensor) -> torch.Tensor:
    """(T, heads, k) scores of the selected experts, read from the (2, T, heads, n_keys) sub-key scores."""
    return sub_scores.gather(-1, halves).sum(0)


@_selected_scores_op.register_fake
def _(queries, keys_left, keys_right, halves, sub_scores):
    return sub_scores.new_empty(halves.shape[1:])


@torch.library.custom_op("peer::selected_scores_backward", mutates_args=())
def _selected_scores_backward_op(d_scores: torch.Tensor, queries: torch.Tensor, keys_left: torch.Tensor,
                                 keys_right: torch.Tensor, halves: torch.Tensor, need_queries: bool,
                                 need_left: bool, need_right: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
            d_queries.append(F.embedding_bag(rows[side].reshape(tokens * heads, k), keys.reshape(-1, d_half),
                                             per_sample_weights=weights, mode="sum"))
        if not needed:
            d_keys.append(keys.new_empty(0))
            continue
        half = queries[..., side * d_half:(side + 1) * d_half]  # (T, heads, d_half), strided
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
    like = lambda t, needed: t.new_empty(t.shape if needed else (0,))  # noqa: E731
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


class _SelectedScores:
    """scores[t, j, i] = left[t, j] . keys.left[g, a] + right[t, j] . keys.right[g, b] for each
    selected expert i = a*n_keys + b (halves = (a, b)), read from the sub-key scores; the
    gradient flows to queries and sub-keys (not to sub_scores). The op peer::selected_scores.
    """

    @staticmethod
    def apply(queries, keys_left, keys_right, halves, sub_scores):
        return torch.ops.peer.selected_scores(queries, keys_left, keys_right, halves, sub_scores)


@functools.cache
def _candidate_pairs(k, device):
    """Stage-two candidates (a, b), ranks in the two sorted stage-one lists, that can matter.

    Every candidate (a', b') with a' <= a and b' <= b scores at least as much as (a, b)
    (float addition is monotone), so (a, b) with (a+1)(b+1) > k has k others scoring at least
    as much: kept are the pairs with (a+1)(b+1) <= k, about k ln k of the k*k. Also kept is
    the first dropped pair of each row a, (a, k // (a+1)), which scores at least as much as
    the rest of its row. If the k+1 best kept scores are distinct, the k-th beats every
    dropped pair strictly (a first dropped pair among the top k would need k kept pairs at
    least as good, a tie), so the top k is the top k of all k*k pairs. Rows with a tie there
    are redone over all k*k pairs under the full order.
    """
    pairs = [(a, b) for a in range(k) for b in range(k) if (a + 1) * (b + 1) <= k]
    pairs += [(a, k // (a + 1)) for a in range(1, k)]
    return torch.tensor(pairs, device=device).T.contiguous()


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


def _product_key_topk(cfg, sub_scores):
    """Expert indices (T, heads, topk) from the (2, T, heads, n_keys) sub-key scores (SPEC §3.6-§3.8),
    ties by (score descending, index ascending); the op peer::product_key_topk, without gradient."""
    return torch.ops.peer.product_key_topk(sub_scores.detach(), cfg.topk)


class _ExpertCount(typing.NamedTuple):
    n_experts: int


@torch.library.custom_op("peer::checked_routing", mutates_args=())
def _checked_routing_op(routing: torch.Tensor, n_experts: int) -> torch.Tensor:
    """The routing override as int64, after checking its values (SPEC §9) where they are known."""
    if routing.numel():
        checks.check_routing_values(_ExpertCount(n_experts), int(routing.min()), int(routing.max()))
    return routing.to(torch.int64, copy=True)


@_checked_routing_op.register_fake
def _(routing, n_experts):
    return routing.new_empty(routing.shape, dtype=torch.int64)


# ---------------------------------------------------------------- experts (SPEC §3.9–§3.11)

# Three kernels over the selections indices (T, heads*topk) of rows of a table (N, d):
#   row_sums:  out[t]    = sum_j weights[t, j] * table[indices[t, j]]        (T, d)
#   row_dots:  out[t, j] = rows[t] . table[indices[t, j]]                   (T, heads*topk)
#   row_outer: out[e]    = sum over indices[t, j] == e of weights[t, j] * rows[t]   (N, d)
# The up projection is row_sums; the down projection is row_dots, its adjoint. Each one's
# backward is made of the other two, so no (T, heads*topk, d) tensor is ever kept. They run on
# embedding_bag's kernels, which never gather: row_sums with one bag per token, row_dots and
# row_outer with one bag per table row over the selections sorted by expert (ExpertGroups), so
# the large table is streamed in order while the small token rows stay in cache. The same
# kernels run eagerly and compiled: peer::down_projection, peer::up_projection, peer::row_outer.

class ExpertGroups(typing.NamedTuple):
    """The selections sorted by expert, computed once per call and shared by every kernel."""

    order: torch.Tensor  # position in indices.reshape(-1) of each sorted selection
    tokens: torch.Tensor  # token of each sorted selection
    experts: torch.Tensor  # expert of each sorted selection (non-decreasing)
    offsets: torch.Tensor  # (N,) start of each expert's run; an unselected expert's run is empty


@torch.library.custom_op("peer::expert_groups", mutates_args=())
def _expert_groups_op(indices: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                   torch.Tensor]:
    """ExpertGroups (order, tokens, experts, offsets) of int64 selections (T, J) of N = n_rows rows."""
    flat = indices.reshape(-1)
    # On CPU a 1-D integer sort takes a parallel radix-sort path that stalls for ~0.1 s when it
    # follows other parallel work; sorting the same keys as one row of a 2-D tensor takes the
    # comparison sort, faster on integers than on any float encoding of them.
    order = torch.sort(flat[None, :], dim=-1).indices[0]
    counts = torch.bincount(flat, minlength=n_rows)
    return order, order // indices.shape[1], flat[order], counts.cumsum(0) - counts


@_expert_groups_op.register_fake
def _(indices, n_rows):
    size = indices.numel()
    return (indices.new_empty(size), indices.new_empty(size), indices.new_empty(size),
            indices.new_empty(n_rows))


def expert_groups(indices, n_rows):
    """ExpertGroups of the int64 selections indices (T, heads*topk) of an (n_rows, d) table."""
    return ExpertGroups(*torch.ops.peer.expert_groups(indices.detach(), n_rows))


def _row_sums(indices, table, weights):
    return F.embedding_bag(indices, table, per_sample_weights=weights.contiguous(), mode="sum")


def _row_dots(indices, table, rows, groups):
    # Read as per-sample weight gradients of row_outer's embedding_bag, these are the dots of
    # each expert's bag against its table row: table[e] . rows[t] for every selection.
    sorted_dots = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        table.contiguous(), rows.contiguous(), groups.tokens, groups.offsets, groups.experts, 0)
    return sorted_dots.new_empty(indices.numel()).index_copy_(0, groups.order, sorted_dots).view(indices.shape)


def _row_outer(groups, weights, rows):
    # One bag per table row, written straight into the dense (N, d) result: empty bags sum to 0.
    return F.embedding_bag(groups.tokens, rows.contiguous(), groups.offsets,
                           per_sample_weights=weights.reshape(-1)[groups.order].contiguous(), mode="sum")


@torch.library.custom_op("peer::row_outer", mutates_args=())
def _row_outer_op(weights: torch.Tensor, rows: torch.Tensor, order: torch.Tensor, tokens: torch.Tensor,
                  experts: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(N, d) sums of weights[t, j] * rows[t] over the selections of each row (no autograd formula)."""
    return _row_outer(ExpertGroups(order, tokens, experts, offsets), weights, rows)


@_row_outer_op.register_fake
def _(weights, rows, order, tokens, experts, offsets):
    return rows.new_empty((offsets.shape[0], rows.shape[1]))


@torch.library.custom_op("peer::down_projection", mutates_args=())
def _down_projection_op(x: torch.Tensor, down: torch.Tensor, indices: torch.Tensor, order: torch.Tensor,
                        tokens: torch.Tensor, experts: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """pre[t, j] = x[t] . down[indices[t, j]]: (T, d) and (N, d) to (T, J)."""
    return _row_dots(indices, down, x, ExpertGroups(order, tokens, experts, offsets))


@_down_projection_op.register_fake
def _(x, down, indices, order, tokens, experts, offsets):
    return x.new_empty(indices.shape)


@torch.library.custom_op("peer::up_projection", mutates_args=())
def _up_projection_op(coef: torch.Tensor, up: torch.Tensor, indices: torch.Tensor, order: torch.Tensor,
                      tokens: torch.Tensor, experts: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """y[t] = sum_j coef[t, j] * up[indices[t, j]]: (T, J) and (N, d) to (T, d)."""
    del order, tokens, experts, offsets  # for the backward
    return _row_sums(indices, up, coef)


@_up_projection_op.register_fake
def _(coef, up, indices, order, tokens, experts, offsets):
    return coef.new_empty((indices.shape[0], up.shape[1]))


def _projection_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _down_projection_backward(ctx, d_pre):
    x, down, indices, *groups = ctx.saved_tensors
    dx = torch.ops.peer.up_projection(d_pre, down, indices, *groups) if ctx.needs_input_grad[0] else None
    d_down = torch.ops.peer.row_outer(d_pre, x, *groups) if ctx.needs_input_grad[1] else None
    return (dx, d_down) + (None,) * 5


def _up_projection_backward(ctx, dy):
    coef, up, indices, *groups = ctx.saved_tensors
    d_coef = torch.ops.peer.down_projection(dy, up, indices, *groups) if ctx.needs_input_grad[0] else None
    d_up = torch.ops.peer.row_outer(coef, dy, *groups) if ctx.needs_input_grad[1] else None
    return (d_coef, d_up) + (None,) * 5


_down_projection_op.register_autograd(_down_projection_backward, setup_context=_projection_setup)
_up_projection_op.register_autograd(_up_projection_backward, setup_context=_projection_setup)


class _DownProjection:
    """pre[t, j] = x[t] . down[indices[t, j]] (the op peer::down_projection); groups None: computed here."""

    @staticmethod
    def apply(x, down, indices, groups=None):
        groups = expert_groups(indices, down.shape[0]) if groups is None else groups
        return torch.ops.peer.down_projection(x, down, indices, *groups)


class _UpProjection:
    """y[t] = sum_j coef[t, j] * up[indices[t, j]] (the op peer::up_projection); groups None: computed here."""

    @staticmethod
    def apply(coef, up, indices, groups=None):
        groups = expert_groups(indices, up.shape[0]) if groups is None else groups
        return torch.ops.peer.up_projection(coef, up, indices, *groups)


def _activation(name, z):
    if name == "gelu":
        return F.gelu(z)
    if name == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if name == "relu":
        return F.relu(z)
    if name == "silu":
        return F.silu(z)
    return z


def _score_weights(name, scores):
    if name == "softmax":
        return torch.softmax(scores, dim=-1)
    if name == "sigmoid":
        return torch.sigmoid(scores)
    return scores


# ---------------------------------------------------------------- the layer

def _query_norm(cfg, params, state, q, valid, training):
    """Batch norm of the queries (SPEC §3.3); valid is None when every token is valid."""
    if cfg.query_norm == "none":
        return q, {}
    running_mean = state["query_norm.mean"].to(q.dtype)
    running_var = state["query_norm.var"].to(q.dtype)
    if not training:
        return _normalise(cfg, params, q, running_mean, running_var), dict(state)
    m = cfg.bn_momentum
    if valid is None and q.shape[0] > 1:
        # Every token counts: PyTorch's fused batch norm, one pass each way, whose running update
        # (momentum, Bessel-corrected variance) is SPEC §3.3's for two or more tokens.
        new_mean, new_var = running_mean.clone(), running_var.clone()
        normed = torch.native_batch_norm(q, params["query_norm.scale"], params["query_norm.offset"],
                                         new_mean, new_var, True, m, cfg.bn_eps)[0]
        return normed, {"query_norm.mean": new_mean, "query_norm.var": new_var}
    # Branch-free in the token count. Masked tokens are left out of the statistics by selection.
    if valid is None:
        valid = torch.ones(q.shape[0], dtype=torch.bool, device=q.device)
    n_valid = valid.sum().to(q.dtype)
    count = n_valid.clamp(min=1)
    batch_mean = torch.where(valid[:, None], q, 0).sum(0) / count
    centred = torch.where(valid[:, None], q - batch_mean, 0)
    batch_var = (centred * centred).sum(0) / count
    # A training call without valid tokens normalises with running statistics, state unchanged.
    has_tokens = n_valid > 0
    mean = torch.where(has_tokens, batch_mean, running_mean)
    var = torch.where(has_tokens, batch_var, running_var)
    unbiased = batch_var.detach() * (n_valid / (n_valid - 1).clamp(min=1))
    new_state = {
        "query_norm.mean": torch.where(has_tokens, (1 - m) * running_mean + m * batch_mean.detach(),
                                       running_mean),
        "query_norm.var": torch.where(has_tokens, (1 - m) * running_var + m * unbiased, running_var),
    }
    return _normalise(cfg, params, q, mean, var), new_state


def _normalise(cfg, params, q, mean, var):
    normed = (q - mean) * torch.rsqrt(var + cfg.bn_eps)
    return normed * params["query_norm.scale"] + params["query_norm.offset"]


@torch.library.custom_op("peer::round_through", mutates_args=())
def _round_through_op(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """value rounded to nearest-even in ``dtype`` and widened back to value's dtype (exact).

    An opaque operator so that torch.compile cannot fold the two casts away (SPEC §10.3 needs
    the rounding); its gradient passes unchanged (straight-through).
    """
    return value.to(dtype).to(value.dtype)


@_round_through_op.register_fake
def _(value, dtype):
    return torch.empty_like(value)


_round_through_op.register_autograd(lambda ctx, grad: (grad, None), setup_context=lambda ctx, inputs, output: None)


class _RoundThrough:
    """Round to a low dtype and widen back; the gradient passes unchanged (SPEC §10.3)."""

    @staticmethod
    def apply(value, dtype):
        return torch.ops.peer.round_through(value, dtype)


def _read_rows(table, flat, low):
    """Rows table[flat] (T, J, d), rounded to ``low`` as they are read (SPEC §10.3).

    The mixed mode gathers, rounds and contracts here instead of calling the peer:: expert ops,
    whose embedding-bag kernels need the table and the token rows in one dtype; a fused kernel
    would read the rows in the low dtype straight from a low-dtype copy of the table.
    """
    return _RoundThrough.apply(F.embedding(flat, table), low)


def _expert_bias(bias, flat, groups):
    """bias[flat], (T, heads*topk), read through the row-dot op (a (N, 1) table dotted with ones):
    its gradient is then the op's grouped sum, where a plain index's backward (an index_put into
    the (N,) gradient) is miscompiled by inductor's CPU code generator when N = 1."""
    return _DownProjection.apply(bias.new_ones((flat.shape[0], 1)), bias[:, None], flat, groups)


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
    q, new_state = _query_norm(cfg, p, state, q, valid, training)
    queries = q.reshape(tokens, cfg.heads, cfg.d_key)
    with torch.no_grad():  # _SelectedScores carries the gradient of the selected scores
        sub_scores = _sub_key_scores(cfg, p, queries)
        if routing is None:
            indices = _product_key_topk(cfg, sub_scores)
        else:
            indices = torch.ops.peer.checked_routing(routing.reshape(tokens, cfg.heads, cfg.topk), cfg.n_experts)
    n = cfg.n_keys
    halves = torch.stack((indices // n, indices % n))
    scores = _SelectedScores.apply(queries, p["keys.left"], p["keys.right"], halves, sub_scores)
    return new_state, indices, scores, _score_weights(cfg.score, scores)


def forward_tensors(cfg, training, params, state, x, mask, routing, low=None, implementation="aten"):
    """The forward pass on validated tensors (all on x's device).

    Returns (y, new_state, indices, scores, weights) with x flattened to (T, d_model) and the
    routing tensors (T, heads, topk). Arithmetic is float32 for bfloat16 and float16 inputs
    (SPEC §10.1); ``low`` (a torch dtype or None) is the mixed mode's (SPEC §10.3);
    ``implementation`` one of IMPLEMENTATIONS, already checked (implementation_for).
    """
    compute = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype
    p = {name: value.to(compute) for name, value in params.items()}
    if low is not None:
        p["query.kernel"] = _RoundThrough.apply(p["query.kernel"], low)
    xf = x.reshape(-1, cfg.d_model).to(compute)
    tokens = xf.shape[0]
    valid = None if mask is None else mask.reshape(tokens)
    if mask is not None:
        xf = torch.where(valid[:, None], xf, 0)  # §5: padding is inert, NaN padding included, in both passes

    new_state, indices, scores, weights = route(cfg, training, p, state, xf, valid, routing)

    flat = indices.reshape(tokens, cfg.heads * cfg.topk)
    if implementation == "triton":  # fused kernels; mixed mode: rows read in low by the kernels
        y = kernels.expert_stage(xf, flat, weights.reshape(flat.shape), p["experts.down"], p["experts.up"],
                                 p["experts.bias"] if cfg.expert_bias else None,
                                 p["experts.gate"] if cfg.expert_glu else None, cfg.activation, low)
    else:
        if low is None:
            groups = expert_groups(flat, cfg.n_experts)
            down = lambda name: _DownProjection.apply(xf, p[name], flat, groups)  # noqa: E731
        else:
            down = lambda name: torch.einsum("td,tjd->tj", xf, _read_rows(p[name], flat, low))  # noqa: E731
        pre = down("experts.down")
        if cfg.expert_bias:
            pre = pre + _expert_bias(p["experts.bias"], flat, groups if low is None else None)
        hidden = _activation(cfg.activation, pre)
        if cfg.expert_glu:  # SPEC §3.10: a linear gate read like the down projection
            hidden = hidden * down("experts.gate")
        coef = weights.reshape(flat.shape) * hidden
        if low is None:
            y = _UpProjection.apply(coef, p["experts.up"], flat, groups)
        else:
            y = torch.einsum("tj,tjo->to", coef, _read_rows(p["experts.up"], flat, low))
    if mask is not None:
        y = torch.where(valid[:, None], y, 0)  # §5: masked tokens output exactly zero
    return y.to(x.dtype), new_state, indices, scores, weights


_COMPILED: dict = {}


def clear_caches():
    """Drop the compiled forward functions (one per config, training flag and argument set)."""
    _COMPILED.clear()


def _runner(cfg, training, has_mask, has_routing, jit, low=None, implementation="aten"):
    low = None if low is None else torch_dtype(low)
    forward = functools.partial(forward_tensors, cfg, training, low=low, implementation=implementation)
    if not jit:
        return forward
    key = (cfg, training, has_mask, has_routing, low, implementation)
    if key not in _COMPILED:
        _COMPILED[key] = _dynamic_tokens(cfg, torch.compile(forward))
    return _COMPILED[key]


def _dynamic_tokens(cfg, compiled):
    """Call compiled with x, mask and routing flattened to one token dimension, marked dynamic:
    one graph serves every leading shape. Dynamo specialises a dimension of size 0 or 1, so
    calls with 0 tokens and with 1 token compile a graph of their own."""

    def run(params, state, x, mask, routing):
        flat = [x.reshape(-1, cfg.d_model),
                None if mask is None else mask.reshape(-1),
                None if routing is None else routing.reshape(-1, cfg.heads, cfg.topk)]
        for value in flat:
            if value is not None:
                torch._dynamo.maybe_mark_dynamic(value, 0)
        # Every compiled config shares one code object, hence one dynamo cache: left to automatic
        # dynamic shapes, a second config would turn the config's ints (topk, n_experts) symbolic
        # and break the graph. Only the token dimension marked above is dynamic; each config, mode
        # and dtype is one cache entry, and past torch._dynamo.config.recompile_limit entries (8 by
        # default) dynamo runs further ones eagerly, as it does for any function.
        with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
            return compiled(params, state, *flat)

    return run


def _to_device(device, params, state, mask, routing):
    move = lambda v: None if v is None else v.to(device)  # noqa: E731
    return ({k: move(v) for k, v in params.items()}, {k: move(v) for k, v in state.items()},
            move(mask), move(routing))


def _aux(cfg, lead, indices, scores, weights):
    shape = lead + (cfg.heads, cfg.topk)
    return {"indices": indices.detach().reshape(shape), "scores": scores.detach().reshape(shape),
            "weights": weights.detach().reshape(shape)}


def apply(cfg, params, state, x, training=False, mask=None, routing=None, *, jit=None, compute_dtype=None,
          implementation=None):
    lead = validate(cfg, params, state, x, training, mask, routing, compute_dtype=compute_dtype)
    implementation = implementation_for(implementation, x.device)
    low = low_dtype(params, compute_dtype)
    params, state, mask, routing = _to_device(x.device, params, state, mask, routing)
    run = _runner(cfg, bool(training), mask is not None, routing is not None, jit, low, implementation)
    y, new_state, indices, scores, weights = run(params, state, x, mask, routing)
    new_state = {name: value.detach() for name, value in new_state.items()}
    return y.reshape(lead + (cfg.d_out,)), new_state, _aux(cfg, lead, indices, scores, weights)


def vjp(cfg, params, state, x, dy, training=False, mask=None, routing=None, *, jit=None, compute_dtype=None,
        implementation=None):
    lead = validate(cfg, params, state, x, training, mask, routing, dy, compute_dtype=compute_dtype)
    implementation = implementation_for(implementation, x.device)
    low = low_dtype(params, compute_dtype)
    params, state, mask, routing = _to_device(x.device, params, state, mask, routing)
    leaves = {name: value.detach().requires_grad_(True) for name, value in params.items()}
    x_leaf = x.detach().requires_grad_(True)
    run = _runner(cfg, bool(training), mask is not None, routing is not None, jit, low, implementation)
    with torch.enable_grad():
        y = run(leaves, state, x_leaf, mask, routing)[0]
        # The cotangent of sum(y * dy) with respect to y is dy itself.
        *d_params, dx = torch.autograd.grad(
            y, [*leaves.values(), x_leaf], grad_outputs=dy.reshape(y.shape).to(y.device),
            allow_unused=True, materialize_grads=True)
    return dict(zip(leaves, d_params)), dx.reshape(lead + (cfg.d_model,))
