"""PEER in TensorFlow: functional init/apply/vjp (SPEC §3, §7, §8).

Arguments are validated in Python through ``peer_ref.checks`` before any graph runs,
so errors equal the reference's. The default path runs one XLA-compiled
``tf.function`` per (config, training, mask?, routing?, dtype), traced once for any
number of tokens.
"""

from __future__ import annotations

import functools
import math
import zlib

import numpy as np
import tensorflow as tf

import peer_ref
from peer_ref import checks
from peer_ref.errors import PEERInputError

from .._implementation import choose
from .core import dtype_name

# The expert stage runs on TensorFlow's own kernels (XLA-compiled on the default path).
IMPLEMENTATIONS = ("tensorflow",)

TF_DTYPES = {"float64": tf.float64, "float32": tf.float32, "bfloat16": tf.bfloat16, "float16": tf.float16}

# A gathered chunk of expert rows (tokens, heads, topk, d) holds at most this many elements.
CHUNK_ELEMENTS = 2**22


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
            params[name] = tf.cast(draw, TF_DTYPES[dtype])
        else:
            params[name] = tf.constant(constants[name], TF_DTYPES[dtype], shape=shape)
    s_dtype = TF_DTYPES[checks.state_dtype(dtype)]
    state = {name: tf.constant(constants[name], s_dtype, shape=shape) for name, shape in cfg.state_shapes().items()}
    return params, state


def apply(cfg, params, state, x, training=False, mask=None, routing=None, *, jit=None, compute_dtype=None,
          implementation=None):
    lead, dtype, training, args, low = _prepare(cfg, params, state, x, training, mask, routing,
                                                compute_dtype=compute_dtype, implementation=implementation)
    fn = _compiled_apply(cfg, training, mask is not None, routing is not None, dtype, **_mixed(low))
    y, new_state, aux = (fn.python_function if jit is False else fn)(*args)
    aux = {key: tf.reshape(value, lead + (cfg.heads, cfg.topk)) for key, value in aux.items()}
    return tf.reshape(y, lead + (cfg.d_out,)), new_state, aux


def vjp(cfg, params, state, x, dy, training=False, mask=None, routing=None, *, jit=None, compute_dtype=None,
        implementation=None):
    lead, dtype, training, args, low = _prepare(cfg, params, state, x, training, mask, routing, dy,
                                                compute_dtype=compute_dtype, implementation=implementation)
    fn = _compiled_vjp(cfg, training, mask is not None, routing is not None, dtype, **_mixed(low))
    grads, dx = (fn.python_function if jit is False else fn)(*args)
    return grads, tf.reshape(dx, lead + (cfg.d_model,))


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
    if isinstance(compute_dtype, np.dtype) or (isinstance(compute_dtype, type) and issubclass(compute_dtype, np.generic)):
        return np.dtype(compute_dtype).name
    return compute_dtype


def check_implementation(implementation) -> str:
    """The implementation to run (only "tensorflow"); see peer_backends._implementation."""
    return choose("tensorflow", implementation, {"tensorflow": None}, list(IMPLEMENTATIONS))


def float32_means_float32() -> None:
    """Switch off TensorFloat-32 in TensorFlow's matrix products (process-wide): SPEC §10.1's
    float32 is float32, which GPUs from Ampere on would otherwise round to a 10-bit mantissa.
    (JAX asks per product, ``precision=HIGHEST``; TensorFlow has only this switch.) Called by
    every apply, vjp and layer call; a no-op after the first."""
    if tf.config.experimental.tensor_float_32_execution_enabled():
        tf.config.experimental.enable_tensor_float_32_execution(False)


def _prepare(cfg, params, state, x, training, mask, routing, dy=None, compute_dtype=None, implementation=None):
    """Validate like the reference; return (leading shape, dtype name, training, flat arguments,
    the mixed mode's low dtype name or None)."""
    check_implementation(implementation)
    float32_means_float32()
    for arg, tree in (("params", params), ("state", state)):
        if not isinstance(tree, dict):
            raise PEERInputError(f"{arg} is {type(tree).__name__}, but expected a dict of arrays")
    params = {name: _as_tensor(f"params[{name!r}]", value) for name, value in params.items()}
    state = {name: _as_tensor(f"state[{name!r}]", value) for name, value in state.items()}
    meta = lambda tree: {k: (tuple(v.shape), dtype_name(v)) for k, v in tree.items()}  # noqa: E731
    dtype = checks.check_params_state(cfg, meta(params), meta(state))
    low = checks.check_compute_dtype(dtype, compute_dtype_name(compute_dtype))
    x = _as_tensor("x", x)
    mask = None if mask is None else _as_tensor("mask", mask)
    routing = None if routing is None else _as_tensor("routing", routing)
    dy = None if dy is None else _as_tensor("dy", dy)
    arr = lambda v: None if v is None else (tuple(v.shape), dtype_name(v))  # noqa: E731
    lead = checks.check_call(cfg, dtype, arr(x), training, arr(mask), arr(routing), arr(dy), compute_dtype=low)
    training = bool(training)  # a NumPy bool is accepted too
    if routing is not None and routing.shape.num_elements():
        checks.check_routing_values(cfg, int(tf.reduce_min(routing)), int(tf.reduce_max(routing)))
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
    p_dtype, s_dtype = TF_DTYPES[dtype], TF_DTYPES[checks.state_dtype(dtype)]
    x_dtype = p_dtype if low is None else TF_DTYPES[low]
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


def clear_caches() -> None:
    """Drop the compiled functions (and with them their XLA executables); see the contract."""
    _compiled_apply.cache_clear()
    _compiled_vjp.cache_clear()


@functools.lru_cache(maxsize=None)
def _compiled_apply(cfg, training, has_mask, has_routing, dtype, *, low=None):
    def run(params, state, x, *extras):
        mask, routing, _ = _unpack(extras, has_mask, has_routing)
        return forward(cfg, params, state, x, training, mask, routing, low=low)

    signature = _signature(cfg, dtype, has_mask, has_routing, has_dy=False, low=low)
    return tf.function(run, input_signature=signature, jit_compile=True)


@functools.lru_cache(maxsize=None)
def _compiled_vjp(cfg, training, has_mask, has_routing, dtype, *, low=None):
    def run(params, state, x, *extras):
        mask, routing, (dy,) = _unpack(extras, has_mask, has_routing)
        with tf.GradientTape() as tape:
            tape.watch((params, x))
            y, _, _ = forward(cfg, params, state, x, training, mask, routing, low=low)
        grads, dx = tape.gradient(y, (params, x), output_gradients=dy,
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return {name: tf.convert_to_tensor(g) for name, g in grads.items()}, dx

    signature = _signature(cfg, dtype, has_mask, has_routing, has_dy=True, low=low)
    return tf.function(run, input_signature=signature, jit_compile=True)


def _round_through(value, low):
    """value rounded to nearest-even in the dtype named ``low`` and widened back (exact); the
    gradient passes unchanged (straight-through, SPEC §10.3)."""

    @tf.custom_gradient
    def run(v):
        return tf.cast(tf.cast(v, TF_DTYPES[low]), v.dtype), lambda grad: grad

    return run(value)


def _read(rows, low):
    """Gathered rows as the computation reads them: rounded to ``low`` in the mixed mode (SPEC §10.3)."""
    return rows if low is None else tf.cast(tf.cast(rows, TF_DTYPES[low]), rows.dtype)


def forward(cfg, params, state, x, training=False, mask=None, routing=None, low=None):
    """The layer on flat tokens: x (T, d_model), mask (T,), routing (T, heads, topk).

    Traceable and differentiable; no validation (callers validate). Parameters may be
    tensors or variables. ``low`` ("bfloat16", "float16" or None) is the mixed mode of
    SPEC §10.3 (float32 parameters, x in ``low``). Returns (y (T, d_out), new_state, aux
    with (T, heads, topk)).
    """
    out_dtype = x.dtype
    # bfloat16 and float16: all arithmetic in float32, rounded once at the end (SPEC §10.1, §10.3).
    compute = tf.float32 if out_dtype in (tf.bfloat16, tf.float16) else out_dtype
    p = {name: tf.cast(value, compute) for name, value in params.items()}
    if low is not None:
        p["query.kernel"] = _round_through(p["query.kernel"], low)
    x = tf.cast(x, compute)
    if mask is not None:
        x = _zero_masked(x, mask)  # padding is inert, even NaN padding, in both passes (SPEC §5)

    q = tf.matmul(x, p["query.kernel"])
    if cfg.query_bias:
        q = q + p["query.bias"]
    q, new_state = _query_norm(cfg, p, state, q, mask, training)
    queries = tf.reshape(q, (-1, cfg.heads, cfg.d_key))

    s_left, s_right = _sub_key_scores(cfg, p, queries)
    indices = _product_key_topk(cfg, s_left, s_right) if routing is None else tf.cast(routing, tf.int64)
    scores = (tf.gather(s_left, indices // cfg.n_keys, batch_dims=2)
              + tf.gather(s_right, indices % cfg.n_keys, batch_dims=2))
    weights = _score_weights(cfg.score, scores)

    y = _experts(cfg, x, weights, indices, p["experts.down"], p["experts.up"], p.get("experts.bias"),
                 p.get("experts.gate"), low)
    if mask is not None:
        y = _zero_masked(y, mask)
    aux = {"indices": indices, "scores": scores, "weights": weights}
    return tf.cast(y, out_dtype), new_state, aux


def _zero_masked(rows, mask):
    # A select, not a product: 0 * NaN would be NaN.
    return tf.where(mask[:, None], rows, tf.zeros_like(rows))


def _query_norm(cfg, p, state, q, mask, training):
    if cfg.query_norm == "none":
        return q, dict(state)
    running_mean = tf.cast(state["query_norm.mean"], q.dtype)
    running_var = tf.cast(state["query_norm.var"], q.dtype)
    if training:
        valid = tf.ones_like(q[:, 0], tf.bool) if mask is None else mask
        n_valid = tf.reduce_sum(tf.cast(valid, q.dtype))
        use_batch = n_valid > 0
        count = tf.maximum(n_valid, 1)
        batch_mean = tf.reduce_sum(_zero_masked(q, valid), axis=0) / count
        batch_var = tf.reduce_sum(_zero_masked(q - batch_mean, valid) ** 2, axis=0) / count
        # No valid token: normalise with the running statistics and leave them unchanged.
        mean = tf.where(use_batch, batch_mean, running_mean)
        var = tf.where(use_batch, batch_var, running_var)
        m = cfg.bn_momentum
        unbiased = batch_var * (n_valid / tf.maximum(n_valid - 1, 1))
        updated = {
            "query_norm.mean": tf.where(use_batch, (1 - m) * running_mean + m * batch_mean, running_mean),
            "query_norm.var": tf.where(use_batch, (1 - m) * running_var + m * unbiased, running_var),
        }
        new_state = {name: tf.stop_gradient(tf.cast(value, state[name].dtype)) for name, value in updated.items()}
    else:
        mean, var, new_state = running_mean, running_var, dict(state)
    inv_std = 1.0 / tf.sqrt(var + cfg.bn_eps)
    return (q - mean) * inv_std * p["query_norm.scale"] + p["query_norm.offset"], new_state


def _sub_key_scores(cfg, p, queries):
    halves = (queries[..., : cfg.d_half], queries[..., cfg.d_half :])
    keys = (p["keys.left"], p["keys.right"])
    if cfg.shared_keys:  # every head reads key set 0
        return tuple(tf.einsum("thd,nd->thn", q, k[0]) for q, k in zip(halves, keys))
    return tuple(tf.einsum("thd,hnd->thn", q, k) for q, k in zip(halves, keys))


def _orderable(scores):
    """Integer keys in the order of SPEC §4.1: value descending, +0 equal to -0, NaN below -inf.

    XLA's top_k orders floats totally (+0 above -0, NaN above everything); the bits of a float,
    with the magnitude bits of negatives flipped, compare as integers like the floats do, and
    NaN takes the lowest key.
    """
    ints = tf.int64 if scores.dtype == tf.float64 else tf.int32
    scores = scores if ints == tf.int64 else tf.cast(scores, tf.float32)
    bits = tf.bitcast(tf.where(scores == 0, tf.zeros_like(scores), scores), ints)
    keys = tf.where(bits < 0, tf.bitwise.bitwise_xor(bits, ints.max), bits)
    return tf.where(tf.math.is_nan(scores), tf.fill(tf.shape(keys), ints.min), keys)


def _product_key_topk(cfg, s_left, s_right):
    """Expert indices (T, heads, topk), int64, by the order rule of SPEC §4.

    tf.math.top_k returns equal values lower position first (checked by the tests), so
    stage 1 breaks ties by lower sub-key index. For stage 2 each side's selection is put
    in ascending sub-key order: the flattened k*k grid is then in ascending expert
    index (left * n_keys + right), and lower position means lower expert index.
    """
    k, n = cfg.topk, cfg.n_keys
    sides = []
    for scores in (s_left, s_right):
        sub_keys = tf.sort(tf.math.top_k(_orderable(scores), k).indices, axis=-1)
        sides.append((tf.cast(sub_keys, tf.int64), tf.gather(scores, sub_keys, batch_dims=2)))
    (left, left_scores), (right, right_scores) = sides
    sums = tf.reshape(left_scores[..., :, None] + right_scores[..., None, :], (-1, cfg.heads, k * k))
    experts = tf.reshape(left[..., :, None] * n + right[..., None, :], (-1, cfg.heads, k * k))
    best = tf.math.top_k(_orderable(sums), k).indices
    return tf.gather(experts, best, batch_dims=2)


def _score_weights(name, scores):
    if name == "softmax":
        return tf.nn.softmax(scores, axis=-1)
    if name == "sigmoid":
        return tf.sigmoid(scores)
    return scores


def _activation(name, z):
    if name == "gelu":
        return 0.5 * z * (1.0 + tf.math.erf(z / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * z * (1.0 + tf.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))
    if name == "relu":
        return tf.nn.relu(z)
    if name == "silu":
        return z * tf.sigmoid(z)
    return z


def _expert_chunk(cfg, x, weights, down_rows, up_rows, bias_rows=None, gate_rows=None):
    """y = sum_{h,k} weights * act(x . down + bias) [* (x . gate)] * up for one chunk of tokens."""
    pre = tf.einsum("td,thkd->thk", x, down_rows)
    if bias_rows is not None:
        pre = pre + bias_rows
    hidden = _activation(cfg.activation, pre)
    if gate_rows is not None:  # GLU experts (SPEC §3.10): times the linear gate
        hidden = hidden * tf.einsum("td,thkd->thk", x, gate_rows)
    return tf.einsum("thk,thko->to", weights * hidden, up_rows)


def _experts(cfg, x, weights, indices, down, up, bias, gate, low=None):
    """The expert MLP over token chunks, so gathered rows never exceed CHUNK_ELEMENTS.

    The custom gradient recomputes each chunk's gathers instead of letting autodiff
    keep all of them, and scatter-adds the row gradients into dense tables. With ``low``
    the gathered rows of down, up and gate (not bias) are rounded to it as they are read;
    their gradients treat the rounding as the identity (SPEC §10.3).
    """
    width = cfg.heads * cfg.topk * max(cfg.d_model, cfg.d_out)
    tokens = tf.shape(x)[0]
    chunk = tf.maximum(tf.minimum(max(1, CHUNK_ELEMENTS // width), tokens), 1)
    # At least one (padding) chunk: XLA compiles the loop body even when it would never run.
    n_chunks = tf.maximum((tokens + chunk - 1) // chunk, 1)
    pad = n_chunks * chunk - tokens
    chunked = lambda t: tf.reshape(  # noqa: E731
        tf.pad(t, [[0, pad]] + [[0, 0]] * (t.shape.rank - 1)), tf.concat([[n_chunks, chunk], tf.shape(t)[1:]], 0))
    idx = chunked(indices)  # padding tokens read expert 0 with weight 0
    # The optional tables present, by name: experts.bias and experts.gate.
    optional_names = [name for name, table in (("bias", bias), ("gate", gate)) if table is not None]

    @tf.custom_gradient
    def run(xs, ws, down, up, *optional):
        names = ["down", "up", *optional_names]

        def rows(i):
            """The chunk's gathered rows of [down, up, *optional], as the computation reads them."""
            return [tf.gather(table, idx[i]) if name == "bias" else _read(tf.gather(table, idx[i]), low)
                    for name, table in zip(names, (down, up, *optional))]

        def chunk_output(x_c, w_c, gathered):
            named = {f"{name}_rows": value for name, value in zip(optional_names, gathered[2:])}
            return _expert_chunk(cfg, x_c, w_c, gathered[0], gathered[1], **named)

        def forward_body(i, ys):
            y = chunk_output(xs[i], ws[i], rows(i))
            return i + 1, tf.tensor_scatter_nd_update(ys, [[i]], y[None])

        # Preallocated outputs rather than a TensorArray: zero chunks must work too.
        ys = tf.zeros(tf.concat([tf.shape(xs)[:2], [cfg.d_out]], 0), xs.dtype)
        _, ys = tf.while_loop(lambda i, _: i < n_chunks, forward_body, (0, ys))

        def grad(dys):
            def backward_body(i, dxs, dws, d_tables):
                inputs = [xs[i], ws[i], *rows(i)]
                with tf.GradientTape() as tape:
                    tape.watch(inputs)
                    y = chunk_output(inputs[0], inputs[1], inputs[2:])
                g = tape.gradient(y, inputs, output_gradients=dys[i])
                flat = tf.reshape(idx[i], (-1, 1))
                # Each table's row gradients, scatter-added into its dense (n_experts, ...) gradient.
                d_tables = [tf.tensor_scatter_nd_add(d, flat, tf.reshape(g_rows, (-1,) + tuple(d.shape[1:])))
                            for d, g_rows in zip(d_tables, g[2:])]
                dxs = tf.tensor_scatter_nd_update(dxs, [[i]], g[0][None])
                dws = tf.tensor_scatter_nd_update(dws, [[i]], g[1][None])
                return i + 1, dxs, dws, d_tables

            state = (0, tf.zeros_like(xs), tf.zeros_like(ws), [tf.zeros_like(t) for t in (down, up, *optional)])
            _, dxs, dws, d_tables = tf.while_loop(lambda i, *_: i < n_chunks, backward_body, state)
            return (dxs, dws, *d_tables)

        return ys, grad

    tables = [table for table in (bias, gate) if table is not None]
    ys = run(chunked(x), chunked(weights), down, up, *tables)
    return tf.reshape(ys, (-1, cfg.d_out))[:tokens]
