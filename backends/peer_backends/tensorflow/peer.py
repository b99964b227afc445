"""PEER in TensorFlow: functional init/apply/vjp (SPEC §3, §7, §8).

The parts live in modules named after the spec's: query_norm (§3.3), routing (§3.4-§3.9, §4),
experts (§3.10-§3.11); this module validates, assembles and compiles them.

Arguments are validated in Python through ``peer_ref.checks`` before any graph runs,
so errors equal the reference's. The default path runs one XLA-compiled
``tf.function`` per (config, training, mask?, routing?, dtype), traced once for any
number of tokens.
"""

from __future__ import annotations

import functools
import zlib

import numpy as np
import tensorflow as tf

import peer_ref
from peer_ref import checks
from peer_ref.errors import PEERConfigError, PEERInputError

from .._implementation import choose
from . import experts
from .core import meta, native_dtype, round_through, zero_masked
from .routing import route

# The expert stage runs on TensorFlow's own kernels (XLA-compiled on the default path).
IMPLEMENTATIONS = ("tensorflow",)


def init(cfg, seed=0, dtype=None):
    dtype = checks.check_dtype_name(dtype or "float32")
    stds, constants = peer_ref.init_std(cfg), peer_ref.init_constant(cfg)
    draw_dtype = tf.float64 if dtype == "float64" else tf.float32
    params = {}
    for name, shape in cfg.param_shapes().items():
        if name in stds:
            # One stateless stream per canonical name: enabling another parameter
            # (query.bias, experts.bias) leaves every other parameter's values unchanged.
            stream = tf.constant([seed, zlib.crc32(name.encode())], tf.int64)
            draw = tf.random.stateless_normal(shape, seed=stream, dtype=draw_dtype) * stds[name]
            params[name] = tf.cast(draw, native_dtype(dtype))
        else:
            params[name] = tf.constant(constants[name], native_dtype(dtype), shape=shape)
    s_dtype = native_dtype(checks.state_dtype(dtype))
    state = {name: tf.constant(constants[name], s_dtype, shape=shape) for name, shape in cfg.state_shapes().items()}
    return params, state


def apply(
    cfg, params, state, x, training=False, mask=None, routing=None, *, jit=None, compute_dtype=None, implementation=None
):
    lead, dtype, training, args, low = _prepare(
        cfg, params, state, x, training, mask, routing, compute_dtype=compute_dtype, implementation=implementation
    )
    fn = _compiled_apply(cfg, training, mask is not None, routing is not None, dtype, **_mixed(low))
    y, new_state, aux = (fn.python_function if jit is False else fn)(*args)
    aux = {key: tf.reshape(value, lead + (cfg.heads, cfg.topk)) for key, value in aux.items()}
    return tf.reshape(y, lead + (cfg.d_out,)), new_state, aux


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
    """``(grads, dx)`` by ``tf.GradientTape`` (SPEC §7). With ``sparse=True`` (SPEC §7.1) the expert
    tables' gradients are ``tf.IndexedSlices``: ``indices`` (int64, (U,)) the experts selected by
    valid tokens, sorted and unique, ``values`` (U,) + the row shape, ``dense_shape`` the table's;
    ``to_numpy`` gives ``peer_ref.RowSparse``. Raises PEERInputError for a ``sparse`` that is not a bool."""
    sparse = checks.check_flag("sparse", sparse)
    if sparse and jit:
        raise PEERConfigError(f"jit=True with sparse=True, but {NO_XLA}; use jit=None (a graph) or False (eager)")
    lead, dtype, training, args, low = _prepare(
        cfg, params, state, x, training, mask, routing, dy, compute_dtype=compute_dtype, implementation=implementation
    )
    fn = _compiled_vjp(cfg, training, mask is not None, routing is not None, dtype, **_mixed(low), **_sparse(sparse))
    grads, dx = (fn.python_function if jit is False else fn)(*args)
    return grads, tf.reshape(dx, lead + (cfg.d_model,))


# Why the row-sparse path never runs under XLA.
NO_XLA = (
    "row-sparse table gradients (SPEC §7.1) have as many rows as experts selected, a shape known only "
    "when the routing is, and XLA-compiled TensorFlow (jit_compile=True) miscompiles or aborts on such "
    "dynamic shapes (tf.unique, tf.boolean_mask): TensorFlow 2.21 on CPU"
)


def _sparse(sparse):
    # Passed only when set, so a dense call keys the compiled-function cache as before.
    return {"sparse": True} if sparse else {}


def _mixed(low):
    # Passed only when set, so a default-mode call keys the compiled-function cache as before.
    return {} if low is None else {"low": low}


def _as_tensor(arg, value):
    if isinstance(value, (tf.Tensor, tf.Variable, np.ndarray)):
        return tf.convert_to_tensor(value)
    raise PEERInputError(f"{arg} is {type(value).__name__}, but expected a tf.Tensor")


def compute_dtype_name(compute_dtype):
    """``compute_dtype`` as a dtype name: a tf.DType (or NumPy dtype) converts, a string or None is
    checked as given."""
    if isinstance(compute_dtype, tf.DType):
        return compute_dtype.name
    if isinstance(compute_dtype, np.dtype) or (
        isinstance(compute_dtype, type) and issubclass(compute_dtype, np.generic)
    ):
        return np.dtype(compute_dtype).name
    return compute_dtype


def choose_implementation(implementation) -> str:
    """The implementation to run (only "tensorflow"); see peer_backends._implementation."""
    return choose("tensorflow", implementation, {"tensorflow": None}, list(IMPLEMENTATIONS))


def float32_means_float32() -> None:
    """Switch off TensorFloat-32 in TensorFlow's matrix products (process-wide): SPEC §10.1's
    float32 is float32, which GPUs from Ampere on would otherwise round to a 10-bit mantissa.
    (JAX asks per product, ``precision=HIGHEST``; TensorFlow has only this switch.) Called by
    every apply, vjp and layer call; a no-op after the first."""
    if tf.config.experimental.tensor_float_32_execution_enabled():
        tf.config.experimental.enable_tensor_float_32_execution(False)


def validate(cfg, params, state, x, training, mask=None, routing=None, dy=None, compute_dtype=None) -> checks.Arguments:
    """Check every argument (tensors) through peer_ref.checks (SPEC §9); returns (lead, dtype,
    low): the leading shape of x, the parameters' dtype name and the mixed mode's low dtype name or None."""
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
        routing_range=lambda r: (int(tf.reduce_min(r)), int(tf.reduce_max(r))),
    )


def _prepare(cfg, params, state, x, training, mask, routing, dy=None, compute_dtype=None, implementation=None):
    """Validate like the reference; return (leading shape, dtype name, training, flat arguments,
    the mixed mode's low dtype name or None)."""
    choose_implementation(implementation)
    float32_means_float32()
    for arg, tree in (("params", params), ("state", state)):
        if not isinstance(tree, dict):
            raise PEERInputError(f"{arg} is {type(tree).__name__}, but expected a dict of arrays")
    params = {name: _as_tensor(f"params[{name!r}]", value) for name, value in params.items()}
    state = {name: _as_tensor(f"state[{name!r}]", value) for name, value in state.items()}
    checks.check_trees(cfg, params, state, meta)  # names, shapes and dtypes before x is looked at
    x, mask, routing, dy = (
        None if value is None else _as_tensor(arg, value)
        for arg, value in (("x", x), ("mask", mask), ("routing", routing), ("dy", dy))
    )
    lead, dtype, low = validate(cfg, params, state, x, training, mask, routing, dy, compute_dtype)
    training = bool(training)  # a NumPy bool is accepted too
    args = [params, state, tf.reshape(x, (-1, cfg.d_model))]
    if mask is not None:
        args.append(tf.reshape(mask, (-1,)))
    if routing is not None:
        args.append(tf.reshape(tf.cast(routing, tf.int64), (-1, cfg.heads, cfg.topk)))
    if dy is not None:
        args.append(tf.reshape(dy, (-1, cfg.d_out)))
    return lead, dtype, training, args, low


def _signature(cfg, dtype, has_mask, has_routing, has_dy, low=None):
    """Shapes with a free token axis, so one trace serves every token count."""
    p_dtype, s_dtype = native_dtype(dtype), native_dtype(checks.state_dtype(dtype))
    x_dtype = p_dtype if low is None else native_dtype(low)
    signature = [
        {name: tf.TensorSpec(shape, p_dtype) for name, shape in cfg.param_shapes().items()},
        {name: tf.TensorSpec(shape, s_dtype) for name, shape in cfg.state_shapes().items()},
        tf.TensorSpec((None, cfg.d_model), x_dtype),
    ]
    if has_mask:
        signature.append(tf.TensorSpec((None,), tf.bool))
    if has_routing:
        signature.append(tf.TensorSpec((None, cfg.heads, cfg.topk), tf.int64))
    if has_dy:
        signature.append(tf.TensorSpec((None, cfg.d_out), x_dtype))
    return signature


def _unpack(extras, has_mask, has_routing):
    extras = list(extras)
    mask = extras.pop(0) if has_mask else None
    routing = extras.pop(0) if has_routing else None
    return mask, routing, extras


def in_xla() -> bool:
    """Whether the function being traced is XLA-compiled (``tf.function(jit_compile=True)``)."""
    from tensorflow.python.framework import ops
    from tensorflow.python.ops import control_flow_util

    return bool(control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph()))


def clear_caches() -> None:
    """Drop the compiled functions (and with them their XLA executables); see the contract."""
    _compiled_apply.cache_clear()
    _compiled_vjp.cache_clear()


@functools.cache
def _compiled_apply(cfg, training, has_mask, has_routing, dtype, *, low=None):
    def run(params, state, x, *extras):
        mask, routing, _ = _unpack(extras, has_mask, has_routing)
        return forward(cfg, params, state, x, training, mask, routing, low=low)

    signature = _signature(cfg, dtype, has_mask, has_routing, has_dy=False, low=low)
    return tf.function(run, input_signature=signature, jit_compile=True)


@functools.cache
def _compiled_vjp(cfg, training, has_mask, has_routing, dtype, *, low=None, sparse=False):
    def run(params, state, x, *extras):
        mask, routing, (dy,) = _unpack(extras, has_mask, has_routing)
        with tf.GradientTape() as tape:
            tape.watch((params, x))
            y, _, _ = forward(cfg, params, state, x, training, mask, routing, low=low, sparse=sparse)
        grads, dx = tape.gradient(
            y, (params, x), output_gradients=dy, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        # SPEC §7.1: the tables' gradients are tf.gather's, IndexedSlices at the gathered rows.
        keep = peer_ref.EXPERT_TABLES if sparse else ()
        return {name: g if name in keep else tf.convert_to_tensor(g) for name, g in grads.items()}, dx

    signature = _signature(cfg, dtype, has_mask, has_routing, has_dy=True, low=low)
    # The sparse path runs as a TensorFlow graph, not XLA (NO_XLA).
    return tf.function(run, input_signature=signature, jit_compile=not sparse)


def forward(cfg, params, state, x, training=False, mask=None, routing=None, low=None, sparse=False):
    """The layer on flat tokens: x (T, d_model), mask (T,), routing (T, heads, topk).

    Traceable and differentiable; no validation (callers validate). Parameters may be
    tensors or variables. ``low`` ("bfloat16", "float16" or None) is the mixed mode of
    SPEC §10.3 (float32 parameters, x in ``low``). Returns (y (T, d_out), new_state, aux
    with (T, heads, topk)).

    ``sparse`` (SPEC §7.1): the expert stage reads only the rows the valid tokens selected,
    gathered once from each table (``tf.gather``), so the tables' gradients are
    ``tf.IndexedSlices`` at those rows (sorted, unique) and no (N, d) gradient is formed.
    """
    out_dtype = x.dtype
    # bfloat16 and float16: all arithmetic in float32, rounded once at the end (SPEC §10.1, §10.3).
    compute = tf.float32 if out_dtype in (tf.bfloat16, tf.float16) else out_dtype
    gathered = peer_ref.EXPERT_TABLES if sparse else ()
    p = {name: tf.cast(value, compute) for name, value in params.items() if name not in gathered}
    if low is not None:
        p["query.kernel"] = round_through(p["query.kernel"], low)
    x = tf.cast(x, compute)
    if mask is not None:
        x = zero_masked(x, mask)  # padding is inert, even NaN padding, in both passes (SPEC §5)

    new_state, indices, scores, weights = route(cfg, training, p, state, x, mask, routing)

    stage_indices = indices
    if sparse:
        if in_xla():
            raise PEERConfigError(
                f"sparse=True inside an XLA-compiled function, but {NO_XLA}; compile the step without XLA "
                "(Keras: model.compile(jit_compile=False); tf.function(jit_compile=False))"
            )
        rows, stage_indices = experts.selected_rows(indices, mask, cfg.n_experts)
        for name in gathered:
            if name in params:
                p[name] = tf.cast(experts.take_rows(params[name], rows), compute)
    y = experts.expert_stage(cfg, p, x, stage_indices, weights, low)
    if mask is not None:
        y = zero_masked(y, mask)
    aux = {"indices": indices, "scores": scores, "weights": weights}
    return tf.cast(y, out_dtype), new_state, aux
