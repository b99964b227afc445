"""PEER as pure JAX functions: init, apply (jax.jit-compiled by default) and vjp (jax.vjp).

The parts live in modules named after the spec's: query_norm (§3.3), routing (§3.4-§3.9, §4),
experts (§3.10-§3.11, implementation "xla"), kernels (the same in Pallas kernels, implementation
"pallas"), parallel (the same on expert tables sharded by columns over a mesh axis,
implementation "sharded"); this module validates and assembles them, once for every
implementation (``forward``).

Arguments are validated outside the compiled function through ``peer_ref.checks``,
so errors are the reference's own. The traced body follows ``peer_ref.forward``
step by step and is differentiated by jax.vjp; only the expert stage has a hand-written
backward, so that gathered expert rows are recomputed rather than kept.
"""

from __future__ import annotations

import functools
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding

import peer_ref
from peer_ref import checks
from peer_ref.errors import PEERConfigError, PEERInputError

from .._implementation import choose
from . import experts
from . import sparse as sparse_rows
from .core import meta, native_dtype, require_x64, round_through
from .routing import route

# Kernels of the expert stage, the default first: "xla" is XLA's own (gathers and segment sums);
# "pallas" is peer_backends.jax.kernels (compiled through Triton on GPUs, interpreted elsewhere);
# "sharded" is XLA's on tables sharded by columns over a mesh axis (peer_backends.jax.parallel),
# chosen by where the tables live.
IMPLEMENTATIONS = ("xla", "pallas", "sharded")


def tables_layout(params):
    """(mesh, axis) where ``experts.down`` is sharded by columns over a mesh axis
    (``parallel.shard``), else None. Read from the array, or under a transform from its type,
    which carries the sharding on Explicit mesh axes (``jax.make_mesh``'s default)."""
    down = params.get("experts.down") if isinstance(params, dict) else None
    if isinstance(down, jax.core.Tracer):
        sharding = jax.typeof(down).sharding
    else:
        sharding = getattr(down, "sharding", None)
    spec = tuple(sharding.spec) if isinstance(sharding, NamedSharding) else ()
    if len(spec) < 2 or not isinstance(spec[1], str):
        return None
    return sharding.mesh, spec[1]


def choose_implementation(implementation, params=None) -> str:
    """The implementation to run on JAX's default device (see peer_backends._implementation).

    "sharded" runs, and only it, where the expert tables in ``params`` are sharded by columns
    (``tables_layout``); otherwise None picks "pallas" when the default backend is "gpu", else
    "xla", and "pallas" can be forced anywhere (off GPUs its kernels run in Pallas's
    interpreter: for testing, slow).
    """
    if params is not None and tables_layout(params) is not None:
        refused = "the expert tables are sharded by columns over a mesh axis, which run 'sharded'"
        return choose("jax", implementation, {"xla": refused, "pallas": refused, "sharded": None}, ["sharded"])
    options = {
        "xla": None,
        "pallas": None,
        "sharded": "the expert tables are not sharded by columns over a mesh axis (parallel.shard)",
    }
    preferred = ["pallas", "xla"] if jax.default_backend() == "gpu" else ["xla", "pallas"]
    return choose("jax", implementation, options, preferred)


def expert_stage_for(implementation, layout=None):
    """The expert stage of ``implementation``, (cfg, p, xf, indices, weights, low) -> y (T, d_out);
    ``layout`` the tables' (mesh, axis) for "sharded". Pallas and shard_map load only when asked for."""
    if implementation == "pallas":
        from . import kernels

        return kernels.expert_stage
    if implementation == "sharded":
        from . import parallel

        return functools.partial(parallel.expert_stage, *layout)
    return experts.expert_stage


def init(cfg, seed=0, dtype=None):
    return init_from_key(cfg, jax.random.key(seed), dtype)


def init_from_key(cfg, key, dtype=None):
    """``init`` from a JAX PRNG key (what a Flax module receives from its Rngs)."""
    dtype = checks.check_dtype_name(dtype or "float32")
    if dtype == "float64":
        require_x64("dtype='float64'")
    return _draw(cfg, dtype, key)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _draw(cfg, dtype, key):
    # One compiled program per (config, dtype) instead of one compile per parameter draw.
    stds, constants = peer_ref.init_std(cfg), peer_ref.init_constant(cfg)
    # bfloat16 and float16 parameters are float32 draws rounded once, so they share float32's distribution.
    draw_dtype = jnp.float64 if dtype == "float64" else jnp.float32
    params = {}
    for name, shape in cfg.param_shapes().items():
        if name in stds:
            # One stream per name: adding an optional parameter leaves the others' draws unchanged.
            name_key = jax.random.fold_in(key, zlib.crc32(name.encode()))
            draw = jax.random.normal(name_key, shape, draw_dtype) * stds[name]
            params[name] = draw.astype(native_dtype(dtype))
        else:
            params[name] = jnp.full(shape, constants[name], native_dtype(dtype))
    state_dtype = native_dtype(checks.state_dtype(dtype))
    state = {name: jnp.full(shape, constants[name], state_dtype) for name, shape in cfg.state_shapes().items()}
    return params, state


# ---------------------------------------------------------------------------- public calls


def apply(
    cfg, params, state, x, training=False, mask=None, routing=None, *, jit=None, compute_dtype=None, implementation=None
):
    low = validate(cfg, params, state, x, training, mask, routing, compute_dtype=compute_dtype).low
    implementation = choose_implementation(implementation, params)
    layout = tables_layout(params) if implementation == "sharded" else None
    run = forward if jit is False else forward_jit
    return run(
        cfg, bool(training), params, state, x, mask, routing, low=low, implementation=implementation, layout=layout
    )


def apply_blocks(
    cfg, params, state, x, blocks, training=False, mask=None, routing=None, *, compute_dtype=None, implementation=None
):
    """``apply`` with the expert stage on the selected rows plus ``blocks`` (``forward``'s), compiled:
    the forward of ``sparse_value_and_grad`` (SPEC §7.1). aux also holds "rows" and "count"."""
    low = validate(cfg, params, state, x, training, mask, routing, compute_dtype=compute_dtype).low
    implementation = choose_implementation(implementation, params)
    if implementation == "sharded":
        raise PEERConfigError(
            "row-sparse table gradients with implementation='sharded', but they are offered on 'xla' and "
            "'pallas' only: the sharded tables' gradients stay dense"
        )
    return forward_jit(
        cfg, bool(training), params, state, x, mask, routing, low=low, implementation=implementation, blocks=blocks
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
    jit=None,
    compute_dtype=None,
    implementation=None,
    sparse=False,
):
    """``(grads, dx)`` by ``jax.vjp`` (SPEC §7). With ``sparse=True`` (SPEC §7.1) the expert tables'
    gradients are ``peer_backends.jax.RowSparse``: rows padded to a static capacity, see
    ``peer_backends.jax.sparse``; ``to_numpy`` gives ``peer_ref.RowSparse``. Raises PEERInputError
    for a ``sparse`` that is not a bool, PEERConfigError for ``sparse=True`` on "sharded"."""
    sparse = checks.check_flag("sparse", sparse)
    low = validate(cfg, params, state, x, training, mask, routing, dy, compute_dtype=compute_dtype).low
    implementation = choose_implementation(implementation, params)
    if sparse and implementation == "sharded":
        raise PEERConfigError(
            "sparse=True with implementation='sharded', but row-sparse table gradients are offered on "
            "'xla' and 'pallas' only: the sharded tables' gradients stay dense (sparse=False)"
        )
    layout = tables_layout(params) if implementation == "sharded" else None
    run = _vjp if jit is False else vjp_jit
    return run(
        cfg,
        bool(training),
        params,
        state,
        x,
        dy,
        mask,
        routing,
        low=low,
        implementation=implementation,
        layout=layout,
        sparse=sparse,
    )


def clear_caches() -> None:
    """Drop every compiled specialisation. A long process that compiles thousands of them
    (the conformance suite) calls this between test modules: each XLA CPU executable holds
    memory mappings, and the kernel's per-process limit on them ends in a crash."""
    jax.clear_caches()


def compute_dtype_name(compute_dtype):
    """``compute_dtype`` as a dtype name: a JAX/NumPy dtype converts, a string or None is checked as given."""
    if isinstance(compute_dtype, np.dtype) or (
        isinstance(compute_dtype, type) and issubclass(compute_dtype, np.generic)
    ):
        return np.dtype(compute_dtype).name
    if isinstance(compute_dtype, type(jnp.float32)):
        return compute_dtype.dtype.name  # a jnp scalar type such as jnp.bfloat16
    return compute_dtype


def _routing_range(routing):
    # Under an outer jax transform routing is abstract and its values cannot be read here.
    return None if isinstance(routing, jax.core.Tracer) else (int(routing.min()), int(routing.max()))


def validate(cfg, params, state, x, training, mask=None, routing=None, dy=None, compute_dtype=None) -> checks.Arguments:
    """Check every argument through peer_ref.checks (SPEC §9); returns (lead, dtype, low): the
    leading shape of x, the parameters' dtype name and the mixed mode's low dtype name or None."""
    for arg, value in (("params", params), ("state", state)):
        if not isinstance(value, dict):
            raise PEERInputError(f"{arg} is {type(value).__name__}, but expected a dict of arrays")
    for arg, value in (("x", x), ("mask", mask), ("routing", routing), ("dy", dy)):
        if value is not None and not isinstance(value, (jax.Array, np.ndarray)):
            raise PEERInputError(f"{arg} is {type(value).__name__}, but expected a jax.Array")
    if checks.check_trees(cfg, params, state, meta) == "float64":
        require_x64("params")
    return checks.check_arguments(
        cfg,
        params,
        state,
        x,
        training,
        mask,
        routing,
        dy,
        compute_dtype_name(compute_dtype),
        meta=meta,
        routing_range=_routing_range,
    )


def _vjp(cfg, training, params, state, x, dy, mask, routing, low=None, implementation="xla", layout=None, sparse=False):
    if sparse:
        return _sparse_vjp(cfg, training, params, state, x, dy, mask, routing, low, implementation)

    def output(params, x):
        return forward(cfg, training, params, state, x, mask, routing, low, implementation, layout)[0]

    y, pullback = jax.vjp(output, params, x)
    grads, dx = pullback(_like(y, dy))
    return grads, dx


def _sparse_vjp(cfg, training, params, state, x, dy, mask, routing, low, implementation):
    """SPEC §7.1: differentiate with respect to zero offsets of the gathered rows (``blocks``),
    not the tables, which enter as constants; no (N, d) cotangent is formed."""
    blocks = sparse_rows.zero_blocks(cfg, params, math.prod(x.shape[:-1]))
    tables = {name: params[name] for name in blocks}
    rest = {name: value for name, value in params.items() if name not in blocks}

    def output(rest, blocks, x):
        y, _, aux = forward(
            cfg, training, {**rest, **tables}, state, x, mask, routing, low, implementation, None, blocks
        )
        return y, (aux["rows"], aux["count"])

    y, pullback, (rows, count) = jax.vjp(output, rest, blocks, x, has_aux=True)
    grads, block_grads, dx = pullback(dy)
    grads.update({name: sparse_rows.RowSparse(rows, value, count) for name, value in block_grads.items()})
    return {name: grads[name] for name in params}, dx


def _like(y, dy):
    """dy in y's layout: on Explicit mesh axes an array's type carries its sharding, and the
    cotangent's must be y's (on Auto axes the compiler places it)."""
    sharding = jax.typeof(y).sharding
    if not isinstance(sharding, NamedSharding):
        return dy
    mesh = sharding.mesh
    names = [n for entry in sharding.spec for n in ((entry,) if isinstance(entry, str) else (entry or ()))]
    explicit = any(mesh.axis_types[mesh.axis_names.index(n)] == AxisType.Explicit for n in names)
    if explicit and tuple(jax.typeof(dy).sharding.spec) != tuple(sharding.spec):
        return jax.reshard(dy, sharding)
    return dy


# ---------------------------------------------------------------------------- forward


def forward(cfg, training, params, state, x, mask, routing, low=None, implementation="xla", layout=None, blocks=None):
    """``peer_ref.forward`` in JAX: the one assembly of routing and expert stage, whatever the
    implementation. cfg, training, low (the mixed mode's dtype name), the implementation name of
    the expert stage and layout (the tables' (mesh, axis) for "sharded") are static.

    ``blocks`` (SPEC §7.1, ``peer_backends.jax.sparse``): None, or per expert table a (C, ...)
    offset (zeros) added to the rows the valid tokens selected; the expert stage then runs on those
    gathered rows, so the gradient with respect to ``blocks`` is the row-sparse table gradient,
    and aux also holds their "rows" (C,) and "count" ()."""
    stage = expert_stage_for(implementation, layout)
    out_dtype = x.dtype
    # bfloat16/float16 policy (SPEC §10.1, §10.3): upcast once, compute in float32, round the outputs once.
    compute = jnp.float32 if out_dtype in (jnp.bfloat16, jnp.float16) else out_dtype
    gathered = () if blocks is None else tuple(blocks)
    p = {name: value.astype(compute) for name, value in params.items() if name not in gathered}
    if low is not None:
        p["query.kernel"] = round_through(p["query.kernel"], low)
    lead = x.shape[:-1]
    tokens = math.prod(lead)
    xf = x.reshape(tokens, cfg.d_model).astype(compute)
    valid = jnp.ones(tokens, bool) if mask is None else mask.reshape(tokens)
    if mask is not None:
        # SPEC §5: padding becomes zero by selection, so NaN/Inf there reaches neither pass.
        xf = jnp.where(valid[:, None], xf, jnp.zeros((), xf.dtype))

    new_state, indices, scores, weights = route(cfg, training, p, state, xf, valid, routing)

    stage_indices, extra = indices, {}
    if blocks is not None:
        size = sparse_rows.capacity(cfg, tokens)
        rows, count, stage_indices = experts.selected_rows(indices, valid, cfg.n_experts, size)
        for name, offset in blocks.items():
            p[name] = (experts.take_rows(params[name], rows) + offset).astype(compute)
        extra = {"rows": rows, "count": count}

    y = stage(cfg, p, xf, stage_indices, weights, low)
    y = jnp.where(valid[:, None], y, jnp.zeros((), y.dtype))  # SPEC §5: a select, so NaN never leaks

    routed = lead + (cfg.heads, cfg.topk)
    aux = {"indices": indices.reshape(routed), "scores": scores.reshape(routed), "weights": weights.reshape(routed)}
    aux.update(extra)
    return y.astype(out_dtype).reshape(lead + (cfg.d_out,)), new_state, aux


# The compiled forward and vjp (jit=None and True); every argument after training is traced but
# low, implementation and layout, which are static like cfg and training.
forward_jit = jax.jit(forward, static_argnums=(0, 1), static_argnames=("low", "implementation", "layout"))
vjp_jit = jax.jit(_vjp, static_argnums=(0, 1), static_argnames=("low", "implementation", "layout", "sparse"))
