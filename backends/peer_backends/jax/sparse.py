"""JAX's own parts of row-sparse table gradients (SPEC §7.1): their padded form, optimizer steps on their rows.

JAX has no sparse cotangents: the gradient of an (N, d) array is an (N, d) array. So the expert
stage is differentiated with respect to the **gathered rows** instead of the tables. After the
routing, the rows the valid tokens selected are found once (``experts.selected_rows``, with a
static size), gathered into a small table ``table[rows]`` (``experts.take_rows``) plus a zero
offset (``zero_blocks``), the selections are renumbered into it, and the expert stage runs on it;
the tables enter as constants, the gradient with respect to the offset is the ``values`` of the
row-sparse gradient, and no (N, d) cotangent is ever formed. The roles shared with the other
backends (finding and gathering the rows) are in ``experts``, under the same names as theirs;
this module holds what only JAX needs.

Finding the rows costs O(N) integer work (a presence map), nothing of size N·d. Shapes are static under ``jax.jit``, and the number ``U`` of rows is known only when the
routing is: the rows come **padded to a capacity** ``C = min(tokens * heads * topk, N)``
(``capacity``), sorted ascending, with every padding entry equal to ``N`` (out of range, so
``.at[rows].set(..., mode="drop")`` drops it and ``.at[rows].get(mode="fill")`` reads zeros),
and ``count`` says how many are real: ``rows[:count]`` are SPEC §7.1's rows, ``values[count:]``
are zeros. ``to_numpy`` (the contract's) strips the padding and gives ``peer_ref.RowSparse``.

``apply_row_updates`` runs an optax transformation on those rows only: it gathers the
optimizer state's rows, updates the (C, d) block and scatters rows back into the table and the
state, in one ``jax.jit`` with the tables and the state donated, so XLA updates them in place
and nothing of size N·d is copied or zeroed per step. It is a **lazy** optimizer (SPEC §7.1).

``peer_backends.jax.sparse_value_and_grad`` (in ``layer``) does the same for the Flax NNX layer
inside any model, and ``RowOptimizer`` steps its tables' rows (``ExpertTable`` is their variable type).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

import peer_ref
from peer_ref.errors import PEERConfigError, PEERInputError

from .experts import take_rows

# SPEC §7.1's tables: the ones indexed by expert.
EXPERT_TABLES = peer_ref.EXPERT_TABLES


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowSparse:
    """The row-sparse gradient of one expert table in JAX (SPEC §7.1), padded to a static size.

    Attributes:
      rows: (C,) int32 (int64 under jax_enable_x64), sorted ascending: ``rows[:count]`` are the
        experts selected by at least one valid token (``peer_ref.gradient_rows``), unique; every
        later entry is the padding row ``N`` (the table's row count, out of range).
      values: (C,) + the table's row shape, the gradient's dtype (the parameters'; float32 in
        the mixed mode): the dense gradient's rows ``rows``; zeros at the padding.
      count: () int32, U, the number of real rows.

    C is ``capacity(cfg, tokens)`` = min(tokens * heads * topk, N). A pytree (it passes through
    ``jax.jit``); ``to_numpy()`` strips the padding.
    """

    rows: jax.Array
    values: jax.Array
    count: jax.Array

    def densify(self, n_rows: int) -> jax.Array:
        """The dense (n_rows, ...) gradient: ``values`` at ``rows``, zeros elsewhere (padding dropped)."""
        dense = jnp.zeros((n_rows,) + self.values.shape[1:], self.values.dtype)
        return dense.at[self.rows].set(self.values, mode="drop")

    def to_numpy(self) -> peer_ref.RowSparse:
        """``peer_ref.RowSparse`` with exactly U rows (int64) and values (U, ...): the padding stripped."""
        count = int(self.count)
        return peer_ref.RowSparse(np.asarray(self.rows)[:count].astype(np.int64), np.asarray(self.values)[:count])


def capacity(cfg, tokens: int) -> int:
    """C, the static number of rows of a ``RowSparse`` for ``tokens`` tokens: min(tokens * heads * topk, N)."""
    return min(tokens * cfg.heads * cfg.topk, cfg.n_experts)


def zero_blocks(cfg, params, tokens: int) -> dict:
    """Zero (C,) + row-shape arrays, one per expert table in ``params``: the block offsets
    whose gradient is the row-sparse gradient (``peer.forward``'s ``blocks``)."""
    size = capacity(cfg, tokens)
    return {
        name: jnp.zeros((size,) + tuple(params[name].shape[1:]), params[name].dtype)
        for name in EXPERT_TABLES
        if name in params
    }


# ---------------------------------------------------------------------------- optax on rows


def _suffix(path, table_paths, shape, shapes):
    """The index of the table whose path ends ``path`` (a state leaf's) with the same shape, or None."""
    for i, table_path in enumerate(table_paths):
        if len(path) >= len(table_path) and tuple(path[len(path) - len(table_path) :]) == table_path:
            return i if shape == shapes[i] else None
    return None


def _state_tables(table_paths, shapes, opt_state):
    """Per state leaf, the index of the table whose rows it holds (adam's mu and nu, momentum's
    trace: the leaves at a table's path with its shape), else None (counts). Refuses leaves at a
    table's path of another shape (factored moments such as adafactor's), whose rows cannot be gathered."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(opt_state)
    owners, bad = [], []
    for path, leaf in leaves:
        shape = tuple(getattr(leaf, "shape", ()))
        owner = _suffix(path, table_paths, shape, shapes)
        if (
            owner is None
            and shape
            and any(len(path) >= len(tp) and tuple(path[len(path) - len(tp) :]) == tp for tp in table_paths)
        ):
            bad.append(shape)
        owners.append(owner)
    if bad:
        raise PEERConfigError(
            f"the optimizer's state has leaves of shapes {bad} at the tables' paths that are not shaped like "
            "the tables, but apply_row_updates expects an elementwise transformation (sgd, momentum, adam, "
            "adamw, rmsprop, adagrad, lion, ...) whose state leaves are table-shaped or scalars"
        )
    return owners, treedef, [leaf for _, leaf in leaves]


def row_update(tx, tables, opt_state, grads):
    """One lazy optimizer step on the rows of ``grads`` (not compiled; ``apply_row_updates`` is).

    ``tables`` any pytree of (N, ...) tables (a dict by canonical name, or an NNX state);
    ``grads`` the same tree with a ``RowSparse`` at each table; ``opt_state`` = ``tx.init(tables)``.
    Returns ``(tables, opt_state)`` updated at the rows ``rows[:count]`` only (padding dropped);
    the state's other leaves (Adam's count) advance as ``tx.update`` advances them.
    """
    table_leaves, treedef = jax.tree_util.tree_flatten_with_path(tables)
    table_paths = [tuple(path) for path, _ in table_leaves]
    tables_flat = [leaf for _, leaf in table_leaves]
    grads_flat = _check_grads(treedef, table_paths, tables_flat, grads)
    shapes = [tuple(t.shape) for t in tables_flat]
    rows = [g.rows for g in grads_flat]
    table_rows = [take_rows(t, r) for t, r in zip(tables_flat, rows)]
    owners, state_def, state_flat = _state_tables(table_paths, shapes, opt_state)
    state_rows = [leaf if i is None else take_rows(leaf, rows[i]) for i, leaf in zip(owners, state_flat)]
    updates, new_state_rows = tx.update(
        treedef.unflatten([g.values for g in grads_flat]),
        state_def.unflatten(state_rows),
        treedef.unflatten(table_rows),
    )
    new_tables = [
        t.at[r].set((block + u).astype(t.dtype), mode="drop", indices_are_sorted=True)
        for t, r, block, u in zip(tables_flat, rows, table_rows, treedef.flatten_up_to(updates))
    ]
    # Table-shaped leaves take their new rows back; every other leaf is the updated one.
    new_state = [
        new if i is None else old.at[rows[i]].set(new.astype(old.dtype), mode="drop", indices_are_sorted=True)
        for i, old, new in zip(owners, state_flat, state_def.flatten_up_to(new_state_rows))
    ]
    return treedef.unflatten(new_tables), state_def.unflatten(new_state)


def _check_grads(treedef, table_paths, tables_flat, grads):
    """grads' RowSparse leaves in the tables' order, or PEERInputError naming what is wrong."""
    try:
        grads_flat = treedef.flatten_up_to(grads)
    except (ValueError, TypeError) as error:
        raise PEERInputError(
            f"grads does not have the tables' structure ({treedef}), but expected the same tree with a "
            f"RowSparse at each table: {error}"
        ) from None
    for path, table, grad in zip(table_paths, tables_flat, grads_flat):
        where = jax.tree_util.keystr(path)
        if not isinstance(grad, RowSparse):
            raise PEERInputError(
                f"grads{where} is {type(grad).__name__}, but expected a RowSparse (vjp(..., sparse=True))"
            )
        if tuple(grad.values.shape[1:]) != tuple(table.shape[1:]):
            raise PEERInputError(
                f"grads{where}.values has rows of shape {tuple(grad.values.shape[1:])}, but the table's "
                f"rows are {tuple(table.shape[1:])}"
            )
    return grads_flat


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(1, 2))
def _apply_row_updates(tx, tables, opt_state, grads):
    return row_update(tx, tables, opt_state, grads)


def apply_row_updates(tx, tables, opt_state, grads):
    """A lazy optax step on the listed rows of the expert tables, in place (SPEC §7.1).

    Args:
      tx: an ``optax.GradientTransformation`` whose state leaves are table-shaped (per-row
        moments: sgd, momentum, adam, adamw, rmsprop, adagrad, lion, ...) or not parameter-shaped
        (counts); a static argument (one compile per transformation object).
      tables: a pytree of (N, ...) tables, e.g. ``{"experts.down": ..., "experts.up": ...}``.
        **Donated**: its buffers are reused for the result and must not be used afterwards.
      opt_state: ``tx.init(tables)``. **Donated** too.
      grads: the same tree with a ``RowSparse`` at each table (``vjp(..., sparse=True)``).

    Returns:
      ``(tables, opt_state)``: the rows ``rows[:count]`` of every table and of every table-shaped
      state leaf replaced by ``tx``'s step on the (C, ...) row block; every other row unchanged
      (not copied: the donated buffers are updated in place), the padding rows dropped. Non-table
      state leaves (Adam's step count) advance once per call, for every row alike.

    This is a **lazy** optimizer (SPEC §7.1): the moments of a row not listed do not decay and
    the row does not move on past momentum or weight decay; a listed row with a zero gradient
    still steps from its moments; Adam's bias correction uses the global step count.
    Inside your own ``jax.jit``-compiled step call ``row_update`` (the same step, not compiled)
    and donate the tables and state there.

    Raises:
      PEERInputError: grads not the tables' tree with a RowSparse of the table's row shape at each table.
      PEERConfigError: a transformation whose state has table-dependent leaves of another shape
        (factored moments, e.g. adafactor).
    """
    table_leaves, treedef = jax.tree_util.tree_flatten_with_path(tables)
    _check_grads(treedef, [tuple(p) for p, _ in table_leaves], [leaf for _, leaf in table_leaves], grads)
    return _apply_row_updates(tx, tables, opt_state, grads)
