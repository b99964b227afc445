"""Expert tables sharded by columns over a mesh axis, with jax.sharding and shard_map.

    mesh = jax.make_mesh((8,), ("model",))
    params, state = parallel.shard(cfg, params, state, mesh)   # tables P(None, "model")
    y, new_state, aux = parallel.apply(cfg, params, state, x, mesh=mesh)

The layout mirrors ``peer_backends.torch.parallel`` (docs/guide/sharding.md): every
device holds all N rows of ``experts.down`` (N, d_model), ``experts.gate`` (N, d_model; GLU
experts, SPEC §3.10) and ``experts.up`` (N, d_out) for its slice of the columns,
``NamedSharding(mesh, PartitionSpec(None, axis))``; every other parameter and the state are
replicated over ``axis``. The routing (query, batch norm, product-key top-k) is computed
replicated, as ``peer._forward`` does. In a ``shard_map`` over ``axis`` each device dots its
columns of x with its columns of the selected down rows (and gate rows) and one explicit
``lax.psum`` sums the stacked partial dots (T * heads * topk scalars per table); a second ``shard_map``
sums the selected up rows' columns into the output's columns, ``PartitionSpec(None, axis)``.
No table row crosses devices, forward or backward: the transposes JAX derives are an
all-reduce of the coefficient gradient and an all-gather of x's gradient columns. Other mesh
axes (e.g. a data axis sharding the tokens) stay under the compiler's automatic partitioning.

For the Flax NNX layer, ``shard_layer(layer, mesh)`` places its variables and makes its calls
take this path, under ``nnx.jit`` or eagerly.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from peer_ref.errors import PEERConfigError, PEERInputError

from .core import HIGHEST
from .experts import _ACTIVATIONS
from .peer import _validate, implementation_for
from .routing import route

# Tables of (N, width) rows sharded by columns. The first kind is dotted with x (their partial
# dots are summed over the axis in one psum); the second is summed into the output.
OUTPUT_TABLES = ("experts.up",)


def dot_tables(cfg) -> tuple[str, ...]:
    """The tables dotted with x: ``experts.down``, and ``experts.gate`` for GLU experts (SPEC §3.10)."""
    return ("experts.down", "experts.gate") if cfg.expert_glu else ("experts.down",)


def column_tables(cfg) -> tuple[str, ...]:
    """Every table sharded by columns, ``PartitionSpec(None, axis)``, for ``cfg``."""
    return dot_tables(cfg) + OUTPUT_TABLES
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
                f"{name} has {width} columns, but expected a multiple of the {size} devices of mesh axis {axis!r}")


def shardings(cfg, mesh, axis: str = DEFAULT_AXIS) -> tuple[dict, dict]:
    """``(params, state)`` dicts of ``NamedSharding``: tables ``P(None, axis)``, the rest ``P()``."""
    _check_mesh(cfg, mesh, axis)
    spec = lambda name: PartitionSpec(None, axis) if name in column_tables(cfg) else PartitionSpec()  # noqa: E731
    return ({name: NamedSharding(mesh, spec(name)) for name in cfg.param_shapes()},
            {name: NamedSharding(mesh, PartitionSpec()) for name in cfg.state_shapes()})


def shard(cfg, params: dict, state: dict, mesh, axis: str = DEFAULT_AXIS) -> tuple[dict, dict]:
    """Place whole ``(params, state)`` (JAX or NumPy arrays) in the column layout on ``mesh``.

    Per device: N * d_model / P (twice with GLU experts) + N * d_out / P table elements, the rest
    replicated.
    Raises PEERInputError for a mesh without ``axis`` or a table width not divisible by its size.
    """
    param_shardings, state_shardings = shardings(cfg, mesh, axis)
    return jax.device_put(params, param_shardings), jax.device_put(state, state_shardings)


def check_implementation(implementation) -> None:
    """The sharded expert stage is XLA's ("xla", or None for it); any other name of
    ``peer.IMPLEMENTATIONS`` raises PEERConfigError, as does an unknown one."""
    if implementation is None or implementation_for(implementation) == "xla":
        return
    raise PEERConfigError(f"implementation={implementation!r}, but the sharded apply and vjp run only 'xla' "
                          "(or None for it): its expert stage is the column-sharded shard_map")


def apply(cfg, params, state, x, training=False, mask=None, routing=None, *, mesh, axis: str = DEFAULT_AXIS,
          implementation=None):
    """``peer_backends.jax.apply`` with the tables sharded by columns over ``mesh``'s ``axis``.

    Same arguments, results and errors as the unsharded call (SPEC §9), plus a PEERInputError
    for a bad mesh or axis and a PEERConfigError for an implementation other than "xla" (or None).
    y comes out sharded by features, ``P(None, axis)`` on its last axis.
    """
    check_implementation(implementation)
    _validate(cfg, params, state, x, training, mask, routing)
    _check_mesh(cfg, mesh, axis)
    return _forward_jit(cfg, bool(training), mesh, axis, params, state, x, mask, routing)


def vjp(cfg, params, state, x, dy, training=False, mask=None, routing=None, *, mesh, axis: str = DEFAULT_AXIS,
        implementation=None):
    """``peer_backends.jax.vjp`` on the sharded layout: gradients come back in the parameters' layout."""
    check_implementation(implementation)
    _validate(cfg, params, state, x, training, mask, routing, dy)
    _check_mesh(cfg, mesh, axis)
    return _vjp_jit(cfg, bool(training), mesh, axis, params, state, x, dy, mask, routing)


def _vjp(cfg, training, mesh, axis, params, state, x, dy, mask, routing):
    def output(params, x):
        return _forward(cfg, training, mesh, axis, params, state, x, mask, routing)[0]

    _, pullback = jax.vjp(output, params, x)
    return pullback(_reshard(dy, mesh, axis, dy.ndim - 1))  # the cotangent in y's layout


def _forward(cfg, training, mesh, axis, params, state, x, mask, routing):
    """``peer._forward`` with the experts of SPEC §3.9-§3.11 computed column-sharded."""
    out_dtype = x.dtype
    compute = jnp.float32 if out_dtype in (jnp.bfloat16, jnp.float16) else out_dtype  # SPEC §10.1
    p = {name: value.astype(compute) for name, value in params.items()}
    lead = x.shape[:-1]
    tokens = math.prod(lead)
    xf = x.reshape(tokens, cfg.d_model).astype(compute)
    valid = jnp.ones(tokens, bool) if mask is None else mask.reshape(tokens)
    if mask is not None:
        xf = jnp.where(valid[:, None], xf, jnp.zeros((), xf.dtype))  # SPEC §5

    # Routing, replicated over the axis: SPEC §3.2-§3.9, the one-device layer's own function.
    new_state, indices, scores, weights = route(cfg, training, p, state, xf, valid, routing)

    columns, whole = PartitionSpec(None, axis), PartitionSpec()
    tables = tuple(p[name] for name in dot_tables(cfg))
    partial_dots = jax.shard_map(
        functools.partial(_summed_dots, axis), mesh=mesh, axis_names={axis},
        in_specs=(columns, whole, (columns,) * len(tables)), out_specs=whole)
    dots = partial_dots(_reshard(xf, mesh, axis, 1), _reshard(indices, mesh, axis),
                        tuple(_reshard(t, mesh, axis, 1) for t in tables))
    pre = dots[0]
    if cfg.expert_bias:
        pre = pre + _rows(p["experts.bias"], indices)
    hidden = _ACTIVATIONS[cfg.activation](pre)
    if cfg.expert_glu:  # SPEC §3.10: times the linear gate x . experts.gate[i]
        hidden = hidden * dots[1]
    coef = weights * hidden
    summed_rows = jax.shard_map(_row_sums, mesh=mesh, axis_names={axis},
                                in_specs=(whole, whole, columns), out_specs=columns)
    y = summed_rows(_reshard(coef, mesh, axis), _reshard(indices, mesh, axis),
                    _reshard(p["experts.up"], mesh, axis, 1))
    y = jnp.where(valid[:, None], y, jnp.zeros((), y.dtype))  # SPEC §5

    routed = lead + (cfg.heads, cfg.topk)
    aux = {"indices": indices.reshape(routed), "scores": scores.reshape(routed), "weights": weights.reshape(routed)}
    return y.astype(out_dtype).reshape(lead + (cfg.d_out,)), new_state, aux


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


@jax.checkpoint
def _dots(x_cols, indices, table):
    return jnp.einsum("thkd,td->thk", _rows(table, indices), x_cols, precision=HIGHEST)  # rows first: see experts.py


def _summed_dots(axis, x_cols, indices, tables):
    """(len(tables), T, heads, topk): every table's dots, partial over columns, summed over the axis."""
    return lax.psum(jnp.stack([_dots(x_cols, indices, table) for table in tables]), axis)


@jax.checkpoint
def _row_sums(coef, indices, table):
    return jnp.einsum("thk,thko->to", coef, _rows(table, indices), precision=HIGHEST)


_forward_jit = jax.jit(_forward, static_argnums=(0, 1, 2, 3))
_vjp_jit = jax.jit(_vjp, static_argnums=(0, 1, 2, 3))


def shard_layer(layer, mesh, axis: str = DEFAULT_AXIS):
    """Shard a ``peer_backends.jax.layer.PEER``'s tables over ``mesh``'s ``axis`` in place; returns it.

    Its variables are placed as ``shardings`` says, and its calls (eager or under ``nnx.jit``)
    run ``apply`` on that mesh. Raises PEERInputError like ``shard``, and PEERConfigError for a
    layer constructed with an implementation other than "xla" (or None).
    """
    check_implementation(layer.implementation)
    params, state = shard(layer.cfg, *layer.params_and_state(), mesh, axis)
    layer.load_params_and_state(params, state)
    layer.expert_sharding = (mesh, axis)
    return layer
