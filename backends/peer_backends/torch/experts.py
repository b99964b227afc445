"""The expert stage (SPEC §3.9-§3.11) on PyTorch's own kernels (implementation "aten"): each
token's h*k selected experts, down projection, bias, activation, GLU gate, router weights and up
projection, and its backward.
"""

import typing

import torch
import torch.nn.functional as F

from peer_ref.forward_pass import ROUNDED_PARAMS

from .core import round_through

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
def _expert_groups_op(
    indices: torch.Tensor, n_rows: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
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
    return (indices.new_empty(size), indices.new_empty(size), indices.new_empty(size), indices.new_empty(n_rows))


def expert_groups(indices, n_rows):
    """ExpertGroups of the int64 selections indices (T, heads*topk) of an (n_rows, d) table."""
    return ExpertGroups(*torch.ops.peer.expert_groups(indices.detach(), n_rows))


def _row_sums(indices, table, weights):
    return F.embedding_bag(indices, table, per_sample_weights=weights.contiguous(), mode="sum")


def _row_dots(indices, table, rows, groups):
    # Read as per-sample weight gradients of row_outer's embedding_bag, these are the dots of
    # each expert's bag against its table row: table[e] . rows[t] for every selection.
    sorted_dots = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        table.contiguous(), rows.contiguous(), groups.tokens, groups.offsets, groups.experts, 0
    )
    return sorted_dots.new_empty(indices.numel()).index_copy_(0, groups.order, sorted_dots).view(indices.shape)


def _row_outer(groups, weights, rows):
    # One bag per table row, written straight into the dense (N, d) result: empty bags sum to 0.
    return F.embedding_bag(
        groups.tokens,
        rows.contiguous(),
        groups.offsets,
        per_sample_weights=weights.reshape(-1)[groups.order].contiguous(),
        mode="sum",
    )


@torch.library.custom_op("peer::row_outer", mutates_args=())
def _row_outer_op(
    weights: torch.Tensor,
    rows: torch.Tensor,
    order: torch.Tensor,
    tokens: torch.Tensor,
    experts: torch.Tensor,
    offsets: torch.Tensor,
) -> torch.Tensor:
    """(N, d) sums of weights[t, j] * rows[t] over the selections of each row (no autograd formula)."""
    return _row_outer(ExpertGroups(order, tokens, experts, offsets), weights, rows)


@_row_outer_op.register_fake
def _(weights, rows, order, tokens, experts, offsets):
    return rows.new_empty((offsets.shape[0], rows.shape[1]))


@torch.library.custom_op("peer::down_projection", mutates_args=())
def _down_projection_op(
    x: torch.Tensor,
    down: torch.Tensor,
    indices: torch.Tensor,
    order: torch.Tensor,
    tokens: torch.Tensor,
    experts: torch.Tensor,
    offsets: torch.Tensor,
) -> torch.Tensor:
    """pre[t, j] = x[t] . down[indices[t, j]]: (T, d) and (N, d) to (T, J)."""
    return _row_dots(indices, down, x, ExpertGroups(order, tokens, experts, offsets))


@_down_projection_op.register_fake
def _(x, down, indices, order, tokens, experts, offsets):
    return x.new_empty(indices.shape)


@torch.library.custom_op("peer::up_projection", mutates_args=())
def _up_projection_op(
    coef: torch.Tensor,
    up: torch.Tensor,
    indices: torch.Tensor,
    order: torch.Tensor,
    tokens: torch.Tensor,
    experts: torch.Tensor,
    offsets: torch.Tensor,
) -> torch.Tensor:
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


def down_projection(x, down, indices, groups=None):
    """pre[t, j] = x[t] . down[indices[t, j]]: x (T, d), down (N, d), indices (T, J) int64 -> (T, J).

    The operator peer::down_projection; ``groups`` (ExpertGroups) None: computed here.
    """
    groups = expert_groups(indices, down.shape[0]) if groups is None else groups
    return torch.ops.peer.down_projection(x, down, indices, *groups)


def up_projection(coef, up, indices, groups=None):
    """y[t] = sum_j coef[t, j] * up[indices[t, j]]: coef (T, J), up (N, d), indices (T, J) -> (T, d).

    The operator peer::up_projection; ``groups`` (ExpertGroups) None: computed here.
    """
    groups = expert_groups(indices, up.shape[0]) if groups is None else groups
    return torch.ops.peer.up_projection(coef, up, indices, *groups)


def activation(name, z):
    """The activation ``name`` of peer_ref.functions (SPEC §3.10) on z."""
    if name == "gelu":
        return F.gelu(z)
    if name == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if name == "relu":
        return F.relu(z)
    if name == "silu":
        return F.silu(z)
    return z


def _read_rows(table, flat, low):
    """Rows table[flat] (T, J, d), rounded to ``low`` as they are read (SPEC §10.3).

    The mixed mode gathers, rounds and contracts here instead of calling the peer:: expert ops,
    whose embedding-bag kernels need the table and the token rows in one dtype; a fused kernel
    would read the rows in the low dtype straight from a low-dtype copy of the table.
    """
    return round_through(F.embedding(flat, table), low)


def expert_bias(bias, flat, groups=None):
    """bias[flat], (T, heads*topk), read through the row-dot op (a (N, 1) table dotted with ones):
    its gradient is then the op's grouped sum, where a plain index's backward (an index_put into
    the (N,) gradient) is miscompiled by inductor's CPU code generator when N = 1."""
    return down_projection(bias.new_ones((flat.shape[0], 1)), bias[:, None], flat, groups)


def round_tables(p, low):
    """``p`` with the expert tables that SPEC §10.3 reads in ``low`` (peer_ref.forward_pass.ROUNDED_PARAMS)
    rounded to it, straight-through; the bias is not rounded."""
    return {
        **p,
        **{name: round_through(p[name], low) for name in ROUNDED_PARAMS if name.startswith("experts.") and name in p},
    }


def expert_stage(cfg, p, xf, flat, weights, low=None, groups=None):
    """y (T, d_out) = sum_j weights[t, j] * e_j(x[t]) over the selections flat (T, heads*topk)
    (SPEC §3.10-§3.11); p: parameters in the compute dtype; xf (T, d_model); weights (T,
    heads*topk); ``low`` (a torch dtype or None): the mixed mode's rounding of the rows (SPEC §10.3);
    ``groups``: the ExpertGroups of flat, or None to compute them. The tables' rows are the
    experts (N = cfg.n_experts), or a call's selected rows (``selected_tables``).
    """
    n_rows = p["experts.down"].shape[0]
    if low is not None and n_rows <= flat.numel():
        # Rounding each whole table once reads no more rows than gathering the T * heads*topk
        # selected ones, and leaves the grouped kernels their full speed: the same values
        # (rounding is elementwise) and the same straight-through gradient.
        return expert_stage(cfg, round_tables(p, low), xf, flat, weights, groups=groups)
    if low is None and groups is None:
        groups = expert_groups(flat, n_rows)

    def down(name):
        if low is None:
            return down_projection(xf, p[name], flat, groups)
        return torch.einsum("td,tjd->tj", xf, _read_rows(p[name], flat, low))

    pre = down("experts.down")
    if cfg.expert_bias:
        pre = pre + expert_bias(p["experts.bias"], flat, groups)
    hidden = activation(cfg.activation, pre)
    if cfg.expert_glu:  # SPEC §3.10: a linear gate read like the down projection
        hidden = hidden * down("experts.gate")
    coef = weights * hidden
    if low is None:
        return up_projection(coef, p["experts.up"], flat, groups)
    return torch.einsum("tj,tjo->to", coef, _read_rows(p["experts.up"], flat, low))


# Row-sparse table gradients (SPEC §7.1). A call with sparse=True gathers, once, the rows of
# each expert table that its tokens selected into small tables of U' rows (peer::take_rows),
# renumbers the selections into them, and runs the implementation's expert stage on those:
# its kernels, grouping and table gradients then work on U' <= T * heads*topk rows, never N.
# The gather's backward hands each table the gradient of its small copy as a coalesced sparse
# COO tensor of the rows that valid tokens selected. Nothing in a step is O(N).


class SelectedRows(typing.NamedTuple):
    """The rows a call selected (``selected_rows``), and its selections renumbered into them."""

    rows: torch.Tensor  # (U',) int64: the gradient's rows (sorted, unique), then the masked tokens'
    listed: int  # U: rows[:U] are the experts selected by valid tokens (SPEC §7.1)
    compact: torch.Tensor  # (T, heads*topk) int64: each selection's position in rows
    groups: ExpertGroups  # of compact, over the U' rows


@torch.library.custom_op("peer::selected_rows", mutates_args=())
def _selected_rows_op(
    indices: torch.Tensor, n_rows: int, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, listed, compact, order, tokens, experts, offsets) of int64 selections (T, J) of
    n_rows rows, ``valid`` (T,) bool or None: see SelectedRows and ExpertGroups."""
    j = indices.shape[1]
    # A masked token's selections sort after every valid one (key e + N): rows[:listed] are the
    # valid tokens' experts, rows[listed:] the masked tokens' (a row selected by both is in both).
    key = indices if valid is None else torch.where(valid[:, None], indices, indices + n_rows)
    key = key.reshape(-1)
    order = torch.sort(key[None, :], dim=-1).indices[0]  # the comparison sort, as in expert_groups
    keys, counts = torch.unique_consecutive(key[order], return_counts=True)
    run = torch.repeat_interleave(torch.arange(keys.numel(), device=key.device), counts, output_size=key.numel())
    compact = torch.empty_like(key).index_copy_(0, order, run).view(indices.shape)
    valid_keys = keys < n_rows
    rows = torch.where(valid_keys, keys, keys - n_rows)
    return rows, valid_keys.sum(), compact, order, order // j, run, counts.cumsum(0) - counts


@_selected_rows_op.register_fake
def _(indices, n_rows, valid):
    size = indices.numel()
    unique = torch.library.get_ctx().new_dynamic_size()
    return (
        indices.new_empty(unique),
        indices.new_empty(()),
        indices.new_empty(indices.shape),
        indices.new_empty(size),
        indices.new_empty(size),
        indices.new_empty(size),
        indices.new_empty(unique),
    )


def selected_rows(indices, n_rows, valid=None):
    """SelectedRows of the int64 selections ``indices`` (T, heads*topk) of a table of n_rows rows;
    ``valid`` (T,) bool or None (every token valid). O(T * heads*topk), independent of n_rows."""
    rows, listed, compact, *groups = torch.ops.peer.selected_rows(indices.detach(), n_rows, valid)
    return SelectedRows(rows, int(listed), compact, ExpertGroups(*groups))


@torch.library.custom_op("peer::take_rows", mutates_args=())
def _take_rows_op(table: torch.Tensor, rows: torch.Tensor, listed: int) -> torch.Tensor:
    """table[rows]: (N, ...) and (U',) to (U', ...). Its gradient is row-sparse: see take_rows."""
    del listed  # for the backward
    return table.index_select(0, rows)


@_take_rows_op.register_fake
def _(table, rows, listed):
    return table.new_empty((rows.shape[0], *table.shape[1:]))


def _take_rows_setup(ctx, inputs, output):
    table, rows, listed = inputs
    ctx.save_for_backward(rows)
    ctx.shape, ctx.listed = table.shape, listed


def _take_rows_backward(ctx, grad):
    (rows,) = ctx.saved_tensors
    listed = ctx.listed
    # rows[:listed] is sorted and unique: the tensor is coalesced as built, with no coalesce pass.
    sparse = torch.sparse_coo_tensor(
        rows[None, :listed], grad[:listed].contiguous(), ctx.shape, is_coalesced=True, check_invariants=False
    )
    return sparse, None, None


_take_rows_op.register_autograd(_take_rows_backward, setup_context=_take_rows_setup)


def take_rows(table, selected):
    """table[selected.rows] (U', ...), whose gradient with respect to ``table`` (N, ...) is a
    coalesced sparse COO tensor (SPEC §7.1): indices (1, U) = selected.rows[:U], the experts
    selected by valid tokens, and values (U, ...) = the gradient's first U rows, in the table's
    dtype. The rows of masked tokens (rows[U:]) are read but left out of the gradient: their
    contributions are zero (SPEC §5). The operator peer::take_rows."""
    return torch.ops.peer.take_rows(table, selected.rows, selected.listed)


def selected_tables(p, names, selected, dtype):
    """{name: take_rows(p[name], selected) in ``dtype``} for the expert tables ``names``: the
    small tables whose rows are the call's selected rows (U' of them), read in ``dtype`` (the
    compute dtype); the cast of U' rows replaces that of the whole table."""
    return {name: take_rows(p[name], selected).to(dtype) for name in names}


def gathered_stage(cfg, p, xf, flat, weights, low=None):
    """``expert_stage`` in plain differentiable torch operations (gather and einsum), which
    torch.func can transform (grad, vjp, jvp, vmap): the expert stage of every implementation
    under a torch.func transform (peer_backends.torch.peer.expert_stage_for). Same arguments."""

    def rows(name):
        return _read_rows(p[name], flat, low) if low is not None else F.embedding(flat, p[name])

    pre = torch.einsum("td,tjd->tj", xf, rows("experts.down"))
    if cfg.expert_bias:
        pre = pre + p["experts.bias"][flat]
    hidden = activation(cfg.activation, pre)
    if cfg.expert_glu:
        hidden = hidden * torch.einsum("td,tjd->tj", xf, rows("experts.gate"))
    return torch.einsum("tj,tjo->to", weights * hidden, rows("experts.up"))
