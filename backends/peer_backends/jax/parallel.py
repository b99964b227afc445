"""Expert tables sharded by columns over a mesh axis, with jax.sharding and shard_map.

    mesh = jax.make_mesh((8,), ("model",))
    params, state = parallel.shard(cfg, params, state, mesh)   # tables P(None, "model")
    y, new_state, aux = peer_backends.jax.apply(cfg, params, state, x)   # runs "sharded"

The layout mirrors ``peer_backends.torch.parallel`` (docs/guide/sharding.md): every
device holds all N rows of ``experts.down`` (N, d_model), ``experts.gate`` (N, d_model; GLU
experts, SPEC §3.10) and ``experts.up`` (N, d_out) for its slice of the columns,
``NamedSharding(mesh, PartitionSpec(None, axis))``; every other parameter and the state are
replicated over ``axis``. Where the tables live chooses the expert stage: ``peer.apply`` and
``peer.vjp`` run implementation "sharded" (``expert_stage`` here) for tables in this layout,
with the routing computed replicated by the one assembly of the forward (``peer.forward``). In
a ``shard_map`` over ``axis`` each device dots its columns of x with its columns of the
selected down rows (and gate rows) and one explicit ``lax.psum`` sums the stacked partial dots
(T * heads * topk scalars per table); a second ``shard_map`` sums the selected up rows' columns
into the output's columns, ``PartitionSpec(None, axis)``. No table row crosses devices, forward
or backward: the transposes JAX derives are an all-reduce of the coefficient gradient and an
all-gather of x's gradient columns. Other mesh axes (e.g. a data axis sharding the tokens) stay
under the compiler's automatic partitioning. Mixed precision (SPEC §10.3) reads each device's
table columns rounded to the low dtype.

Under a transform the layout is read from the arrays' types, which carry it on Explicit mesh
axes (``jax.make_mesh``'s default); ``apply``/``vjp`` here place whole arrays first and run the
same functions. For the Flax NNX layer, ``shard_layer(layer, mesh)`` places its variables, and
its calls (under ``nnx.jit`` or eagerly) then run "sharded".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from peer_ref.errors import PEERConfigError, PEERInputError

from ..sharding import OUTPUT_TABLES, column_tables, dot_tables
from . import peer
from .core import HIGHEST, round_through
from .experts import ACTIVATIONS

__all__ = [
    "DEFAULT_AXIS",
    "OUTPUT_TABLES",
    "apply",
    "column_tables",
    "dot_tables",
    "expert_stage",
    "shard",
    "shard_layer",
    "shardings",
    "vjp",
]

DEFAULT_AXIS = "model"


def _check_mesh(cfg, mesh, axis):
    if not isinstance(mesh, jax.sharding.Mesh):
        raise PEERInputError(f"mesh is {type(mesh).__name__}, but expected a jax.sharding.Mesh")
    if axis not in mesh.axis_names:
        raise PEERInputError(f"axis={axis!r}, but expected one of the mesh's axes {mesh.axis_names}")
    size = mesh.shape[axis]
    for name in column_tables(cfg):
        width = cfg.param_shapes()[name][1]
        if width % size:
            raise PEERInputError(
                f"{name} has {width} columns, but expected a multiple of the {size} devices of mesh axis {axis!r}"
            )


def shardings(cfg, mesh, axis: str = DEFAULT_AXIS) -> tuple[dict, dict]:
    """``(params, state)`` dicts of ``NamedSharding``: tables ``P(None, axis)``, the rest ``P()``."""
    _check_mesh(cfg, mesh, axis)
    columns, whole = PartitionSpec(None, axis), PartitionSpec()
    return (
        {name: NamedSharding(mesh, columns if name in column_tables(cfg) else whole) for name in cfg.param_shapes()},
        {name: NamedSharding(mesh, PartitionSpec()) for name in cfg.state_shapes()},
    )


def shard(cfg, params: dict, state: dict, mesh, axis: str = DEFAULT_AXIS) -> tuple[dict, dict]:
    """Place whole ``(params, state)`` (JAX or NumPy arrays) in the column layout on ``mesh``.

    Per device: N * d_model / P (twice with GLU experts) + N * d_out / P table elements, the rest
    replicated.
    Raises PEERInputError for a mesh without ``axis`` or a table width not divisible by its size.
    """
    param_shardings, state_shardings = shardings(cfg, mesh, axis)
    return jax.device_put(params, param_shardings), jax.device_put(state, state_shardings)


def apply(
    cfg,
    params,
    state,
    x,
    training=False,
    mask=None,
    routing=None,
    *,
    mesh,
    axis: str = DEFAULT_AXIS,
    jit=None,
    compute_dtype=None,
    implementation=None,
):
    """``peer_backends.jax.apply`` with the tables placed by columns over ``mesh``'s ``axis`` first
    (``shard``; nothing moves for arrays already there), so that it runs "sharded".

    Same arguments, results and errors as the unsharded call (SPEC §9), plus a PEERInputError
    for a bad mesh or axis and a PEERConfigError for an implementation other than "sharded" (or
    None). y comes out sharded by features, ``P(None, axis)`` on its last axis.
    """
    peer.validate(cfg, params, state, x, training, mask, routing, compute_dtype=compute_dtype)
    params, state = shard(cfg, params, state, mesh, axis)
    return peer.apply(
        cfg,
        params,
        state,
        x,
        training,
        mask,
        routing,
        jit=jit,
        compute_dtype=compute_dtype,
        implementation=implementation,
    )


def vjp(
    cfg,
    params,
    state,
    x,
    dy,
    training=False,
    mask=None,
    routing=None,
    *,
    mesh,
    axis: str = DEFAULT_AXIS,
    jit=None,
    compute_dtype=None,
    implementation=None,
):
    """``peer_backends.jax.vjp`` on the sharded layout (see ``apply``): gradients come back in the
    parameters' layout."""
    peer.validate(cfg, params, state, x, training, mask, routing, dy, compute_dtype=compute_dtype)
    params, state = shard(cfg, params, state, mesh, axis)
    return peer.vjp(
        cfg,
        params,
        state,
        x,
        dy,
        training,
        mask,
        routing,
        jit=jit,
        compute_dtype=compute_dtype,
        implementation=implementation,
    )


def expert_stage(mesh, axis, cfg, p, xf, indices, weights, low=None):
    """The expert stage of implementation "sharded" (``peer.expert_stage_for``, with the tables'
    ``mesh`` and ``axis`` bound): SPEC §3.9-§3.11 on each device's columns of the tables; the
    role's other arguments as ``experts.expert_stage``. y (T, d_out) comes out ``P(None, axis)``."""
    columns, whole = PartitionSpec(None, axis), PartitionSpec()
    tables = tuple(p[name] for name in dot_tables(cfg))
    partial_dots = jax.shard_map(
        functools.partial(_summed_dots, axis, low),
        mesh=mesh,
        axis_names={axis},
        in_specs=(columns, whole, (columns,) * len(tables)),
        out_specs=whole,
    )
    dots = partial_dots(
        _reshard(xf, mesh, axis, 1), _reshard(indices, mesh, axis), tuple(_reshard(t, mesh, axis, 1) for t in tables)
    )
    pre = dots[0]
    if cfg.expert_bias:
        pre = pre + _rows(p["experts.bias"], indices)
    hidden = ACTIVATIONS[cfg.activation](pre)
    if cfg.expert_glu:  # SPEC §3.10: times the linear gate x . experts.gate[i]
        hidden = hidden * dots[1]
    coef = weights * hidden
    summed_rows = jax.shard_map(
        functools.partial(_row_sums, low),
        mesh=mesh,
        axis_names={axis},
        in_specs=(whole, whole, columns),
        out_specs=columns,
    )
    return summed_rows(
        _reshard(coef, mesh, axis), _reshard(indices, mesh, axis), _reshard(p["experts.up"], mesh, axis, 1)
    )


def _reshard(value, mesh, axis, dim=None):
    """``value`` sharded over ``axis`` along ``dim`` (None: replicated over it), for shard_map.

    On an Auto axis shard_map's in_specs reshard by themselves. On an Explicit one the array's
    type carries its sharding, so it is resharded here, its other mesh axes (e.g. data) kept.
    """
    if mesh.axis_types[mesh.axis_names.index(axis)] != AxisType.Explicit:
        return value
    current = _current_spec(value)
    merged = tuple(axis if i == dim else (None if have == axis else have) for i, have in enumerate(current))
    if merged == current:
        return value
    return jax.reshard(value, NamedSharding(mesh, PartitionSpec(*merged)))


def _current_spec(value):
    spec = tuple(jax.typeof(value).sharding.spec)
    return spec + (None,) * (value.ndim - len(spec))


# Per device, inside shard_map: x_cols (T, d/P), tables (N, d/P), indices (T, heads, topk).
# jax.checkpoint keeps the gathered (T, heads, topk, d/P) rows out of the residuals: the
# backward gathers them again.


def _rows(table, indices):
    """table[indices]; on a mesh whose other axes are Explicit the rows follow the indices' layout."""
    sharding = jax.typeof(indices).sharding
    spec = tuple(sharding.spec)
    if any(name is not None for name in spec):
        rows = PartitionSpec(*spec, *(None,) * (table.ndim - 1))
        return table.at[indices].get(out_sharding=NamedSharding(sharding.mesh, rows))
    return table[indices]


def _read(table, low):
    # The mixed mode reads each device's columns rounded to low (rounding is elementwise, so a
    # column slice rounds as the whole table does); the gradient passes unchanged (SPEC §10.3).
    return table if low is None else round_through(table, low)


@functools.partial(jax.checkpoint, static_argnums=(0,))
def _dots(low, x_cols, indices, table):
    return jnp.einsum("thkd,td->thk", _rows(_read(table, low), indices), x_cols, precision=HIGHEST)  # rows first


def _summed_dots(axis, low, x_cols, indices, tables):
    """(len(tables), T, heads, topk): every table's dots, partial over columns, summed over the axis."""
    return lax.psum(jnp.stack([_dots(low, x_cols, indices, table) for table in tables]), axis)


@functools.partial(jax.checkpoint, static_argnums=(0,))
def _row_sums(low, coef, indices, table):
    return jnp.einsum("thk,thko->to", coef, _rows(_read(table, low), indices), precision=HIGHEST)


def shard_layer(layer, mesh, axis: str = DEFAULT_AXIS):
    """Shard a ``peer_backends.jax.layer.PEER``'s tables over ``mesh``'s ``axis`` in place; returns it.

    Its variables are placed as ``shardings`` says; its calls (eager, or under ``nnx.jit`` on
    Explicit mesh axes, ``jax.make_mesh``'s default) then run implementation "sharded", chosen
    by where the tables live. Raises PEERInputError like ``shard``, and PEERConfigError for a
    layer constructed with an implementation other than "sharded" (or None).
    """
    if layer.implementation not in (None, "sharded"):
        raise PEERConfigError(
            f"implementation={layer.implementation!r}, but sharded expert tables run 'sharded' "
            "(build the layer with implementation=None or 'sharded')"
        )
    params, state = shard(layer.cfg, *layer.params_and_state(), mesh, axis)
    layer.load_params_and_state(params, state)
    return layer
