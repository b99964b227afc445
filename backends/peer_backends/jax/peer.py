"""PEER as pure JAX functions: init, apply (jax.jit-compiled by default) and vjp (jax.vjp).

Arguments are validated outside the compiled function through ``peer_ref.checks``,
so errors are the reference's own. The traced body follows ``peer_ref.forward``
step by step and is differentiated by jax.vjp; only the expert MLP (``_experts``) has a
hand-written backward, so that gathered expert rows are recomputed rather than kept.
"""

from __future__ import annotations

import functools
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import peer_ref
from peer_ref import checks
from peer_ref.errors import PEERInputError

from .._implementation import choose
from .core import dtype_name, index_dtype, require_x64

# Kernels of the expert stage, the default first: "xla" is XLA's own (gathers and segment sums);
# "pallas" is peer_backends.jax.kernels (compiled through Triton on GPUs, interpreted elsewhere).
IMPLEMENTATIONS = ("xla", "pallas")


def implementation_for(implementation) -> str:
    """The implementation to run on JAX's default device (see peer_backends._implementation).

    None picks "pallas" when the default backend is "gpu", else "xla"; "pallas" can be forced
    anywhere (off GPUs its kernels run in Pallas's interpreter: for testing, slow).
    """
    preferred = ["pallas", "xla"] if jax.default_backend() == "gpu" else ["xla", "pallas"]
    return choose("jax", implementation, {"xla": None, "pallas": None}, preferred)

# float32 means float32 (SPEC §10.1): on GPUs XLA would otherwise use TF32 in matrix products.
HIGHEST = lax.Precision.HIGHEST

_DTYPES = {"float64": jnp.float64, "float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Gathered expert rows per chunk of tokens (tokens * heads * topk): bounds each
# (chunk, heads, topk, d) gather at 32 MiB for d = 256 in float32. On CPU, 8192 rows
# ran about 1.7x slower per step and 65536 no faster (d_model=256, h=8, k=16, 2048 tokens).
_ROWS_PER_CHUNK = 32768

_ACTIVATIONS = {
    "gelu": lambda z: jax.nn.gelu(z, approximate=False),
    "gelu_tanh": lambda z: jax.nn.gelu(z, approximate=True),
    "relu": jax.nn.relu,  # its derivative at 0 is 0, as SPEC §7 requires
    "silu": jax.nn.silu,
    "identity": lambda z: z,
}
_SCORE_WEIGHTS = {
    "softmax": lambda s: jax.nn.softmax(s, axis=-1),
    "sigmoid": jax.nn.sigmoid,
    "none": lambda s: s,
}


# ---------------------------------------------------------------------------- init

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
            params[name] = draw.astype(_DTYPES[dtype])
        else:
            params[name] = jnp.full(shape, constants[name], _DTYPES[dtype])
    state_dtype = _DTYPES[checks.state_dtype(dtype)]
    state = {name: jnp.full(shape, constants[name], state_dtype) for name, shape in cfg.state_shapes().items()}
    return params, state


# ---------------------------------------------------------------------------- public calls

def apply(cfg, params, state, x, training=False, mask=None, routing=None, *, jit=None, compute_dtype=None,
          implementation=None):
    _validate(cfg, params, state, x, training, mask, routing, compute_dtype=compute_dtype)
    implementation = implementation_for(implementation)
    run = _forward if jit is False else _forward_jit
    return run(cfg, bool(training), params, state, x, mask, routing, low=low_dtype(params, compute_dtype),
               implementation=implementation)


def vjp(cfg, params, state, x, dy, training=False, mask=None, routing=None, *, jit=None, compute_dtype=None,
        implementation=None):
    _validate(cfg, params, state, x, training, mask, routing, dy, compute_dtype=compute_dtype)
    implementation = implementation_for(implementation)
    run = _vjp if jit is False else _vjp_jit
    return run(cfg, bool(training), params, state, x, dy, mask, routing, low=low_dtype(params, compute_dtype),
               implementation=implementation)


def compute_dtype_name(compute_dtype):
    """``compute_dtype`` as a dtype name: a JAX/NumPy dtype converts, a string or None is checked as given."""
    if isinstance(compute_dtype, np.dtype) or (isinstance(compute_dtype, type) and issubclass(compute_dtype, np.generic)):
        return np.dtype(compute_dtype).name
    if isinstance(compute_dtype, type(jnp.float32)):
        return compute_dtype.dtype.name  # a jnp scalar type such as jnp.bfloat16
    return compute_dtype


def low_dtype(params, compute_dtype):
    """The mixed mode's low dtype name for validated params, or None (SPEC §10.3)."""
    return checks.check_compute_dtype(dtype_name(params["query.kernel"]), compute_dtype_name(compute_dtype))


def _validate(cfg, params, state, x, training, mask, routing, dy=None, compute_dtype=None):
    for arg, value in (("params", params), ("state", state)):
        if not isinstance(value, dict):
            raise PEERInputError(f"{arg} is {type(value).__name__}, but expected a dict of arrays")
    for arg, value in (("x", x), ("mask", mask), ("routing", routing), ("dy", dy)):
        if value is not None and not isinstance(value, (jax.Array, np.ndarray)):
            raise PEERInputError(f"{arg} is {type(value).__name__}, but expected a jax.Array")
    meta = lambda tree: {name: (np.shape(v), dtype_name(v)) for name, v in tree.items()}  # noqa: E731
    dtype = checks.check_params_state(cfg, meta(params), meta(state))
    if dtype == "float64":
        require_x64("params")
    low = checks.check_compute_dtype(dtype, compute_dtype_name(compute_dtype))
    arr = lambda v: None if v is None else (np.shape(v), dtype_name(v))  # noqa: E731
    checks.check_call(cfg, dtype, arr(x), training, arr(mask), arr(routing), arr(dy), compute_dtype=low)
    # Under an outer jax transform routing is abstract and its values cannot be read here.
    if routing is not None and np.size(routing) and not isinstance(routing, jax.core.Tracer):
        checks.check_routing_values(cfg, int(routing.min()), int(routing.max()))


def _vjp(cfg, training, params, state, x, dy, mask, routing, low=None, implementation="xla"):
    def output(params, x):
        return _forward(cfg, training, params, state, x, mask, routing, low, implementation)[0]

    _, pullback = jax.vjp(output, params, x)
    grads, dx = pullback(dy)
    return grads, dx


# ---------------------------------------------------------------------------- forward

@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _round_through(value, low):
    """value rounded to nearest-even in the dtype named ``low`` and widened back (exact); the
    gradient passes unchanged (straight-through, SPEC §10.3)."""
    return value.astype(_DTYPES[low]).astype(value.dtype)


_round_through.defvjp(lambda value, low: (_round_through(value, low), None), lambda low, _, grad: (grad,))


def _read(rows, low):
    """Rows as the computation reads them: rounded to ``low`` in the mixed mode (SPEC §10.3)."""
    return rows if low is None else rows.astype(_DTYPES[low]).astype(rows.dtype)


def _forward(cfg, training, params, state, x, mask, routing, low=None, implementation="xla"):
    """``peer_ref.forward`` in JAX; cfg, training, low (the mixed mode's dtype name) and the
    implementation name of the expert stage are static."""
    out_dtype = x.dtype
    # bfloat16/float16 policy (SPEC §10.1, §10.3): upcast once, compute in float32, round the outputs once.
    compute = jnp.float32 if out_dtype in (jnp.bfloat16, jnp.float16) else out_dtype
    p = {name: value.astype(compute) for name, value in params.items()}
    if low is not None:
        p["query.kernel"] = _round_through(p["query.kernel"], low)
    lead = x.shape[:-1]
    tokens = math.prod(lead)
    xf = x.reshape(tokens, cfg.d_model).astype(compute)
    valid = jnp.ones(tokens, bool) if mask is None else mask.reshape(tokens)
    if mask is not None:
        # SPEC §5: padding becomes zero by selection, so NaN/Inf there reaches neither pass.
        xf = jnp.where(valid[:, None], xf, jnp.zeros((), xf.dtype))

    new_state, indices, scores, weights = route(cfg, training, p, state, xf, valid, routing)

    bias = p["experts.bias"] if cfg.expert_bias else None
    gate = p["experts.gate"] if cfg.expert_glu else None
    if implementation == "pallas":
        from .kernels import experts as pallas_experts

        y = pallas_experts(cfg.activation, low, xf, indices, weights, p["experts.down"], p["experts.up"], bias, gate)
    else:
        chunk = max(1, _ROWS_PER_CHUNK // (cfg.heads * cfg.topk))
        y = _experts(cfg.activation, chunk, low, xf, indices, weights, p["experts.down"], p["experts.up"], bias, gate)
    y = jnp.where(valid[:, None], y, jnp.zeros((), y.dtype))  # SPEC §5: a select, so NaN never leaks

    routed = lead + (cfg.heads, cfg.topk)
    aux = {"indices": indices.reshape(routed), "scores": scores.reshape(routed), "weights": weights.reshape(routed)}
    return y.astype(out_dtype).reshape(lead + (cfg.d_out,)), new_state, aux


def route(cfg, training, p, state, xf, valid, routing):
    """Query, batch norm, product-key top-k and router weights (SPEC §3.2-§3.9, §4).

    p: parameters in the compute dtype; xf (T, d_model), masked tokens already zeroed; valid (T,)
    bool; routing (..., heads, topk) or None. Returns (new_state, indices, scores, weights), the
    last three (T, heads, topk); only the selected scores carry gradient to the sub-keys.
    """
    tokens = xf.shape[0]
    q = jnp.matmul(xf, p["query.kernel"], precision=HIGHEST)
    if cfg.query_bias:
        q = q + p["query.bias"]
    q, new_state = _query_norm(cfg, p, state, q, valid, training)
    queries = q.reshape(tokens, cfg.heads, cfg.d_key)
    s_left = _sub_key_scores(cfg, queries[..., : cfg.d_half], p["keys.left"])
    s_right = _sub_key_scores(cfg, queries[..., cfg.d_half :], p["keys.right"])
    if routing is None:
        indices = _product_key_topk(cfg, lax.stop_gradient(s_left), lax.stop_gradient(s_right))
    else:
        indices = routing.reshape(tokens, cfg.heads, cfg.topk).astype(index_dtype())
    n = cfg.n_keys
    scores = (jnp.take_along_axis(s_left, indices // n, axis=-1)
              + jnp.take_along_axis(s_right, indices % n, axis=-1))
    return new_state, indices, scores, _SCORE_WEIGHTS[cfg.score](scores)


def _query_norm(cfg, p, state, q, valid, training):
    """Batch norm over valid tokens (SPEC §3.3); returns (normalised query, new state)."""
    if cfg.query_norm == "none":
        return q, dict(state)
    running_mean = state["query_norm.mean"].astype(q.dtype)
    running_var = state["query_norm.var"].astype(q.dtype)
    if training:
        n_valid = valid.sum()
        # max(n, 1) keeps the unused batch branch finite (and its gradient free of 0/0) when n == 0.
        count = jnp.maximum(n_valid, 1).astype(q.dtype)
        batch_mean = jnp.where(valid[:, None], q, 0).sum(axis=0) / count
        batch_var = jnp.where(valid[:, None], (q - batch_mean) ** 2, 0).sum(axis=0) / count
        use_batch = n_valid > 0
        m = cfg.bn_momentum
        unbiased = batch_var * (count / jnp.maximum(count - 1, 1))
        new_state = {}
        for name, batch_value in (("query_norm.mean", batch_mean), ("query_norm.var", unbiased)):
            old = state[name]
            updated = ((1 - m) * old + m * lax.stop_gradient(batch_value)).astype(old.dtype)
            new_state[name] = jnp.where(use_batch, updated, old)
        mean = jnp.where(use_batch, batch_mean, running_mean)
        var = jnp.where(use_batch, batch_var, running_var)
    else:
        mean, var, new_state = running_mean, running_var, dict(state)
    normed = (q - mean) * (1 / jnp.sqrt(var + cfg.bn_eps))
    return normed * p["query_norm.scale"] + p["query_norm.offset"], new_state


def _sub_key_scores(cfg, q_half, keys):
    """(T, heads, d_half) x key sets -> (T, heads, n_keys); shared keys: every head reads set 0."""
    if cfg.shared_keys:
        return jnp.einsum("thd,nd->thn", q_half, keys[0], precision=HIGHEST)
    return jnp.einsum("thd,hnd->thn", q_half, keys, precision=HIGHEST)


def _rank_keys(scores):
    """Integer keys in the order of SPEC §4.1: value descending, +0 equal to -0, NaN below -inf.

    lax.top_k orders floats totally (-0.0 below +0.0, NaN above everything); the bits of a
    float, with the magnitude bits of negatives flipped, compare as integers like the floats do,
    and NaN takes the lowest key. top_k puts the lower position first among equal keys.
    """
    ints = jnp.int64 if scores.dtype == jnp.float64 else jnp.int32
    scores = scores.astype(jnp.float32) if ints == jnp.int32 else scores
    bits = lax.bitcast_convert_type(jnp.where(scores == 0, jnp.zeros((), scores.dtype), scores), ints)
    keys = jnp.where(bits < 0, bits ^ jnp.iinfo(ints).max, bits)
    return jnp.where(jnp.isnan(scores), jnp.iinfo(ints).min, keys)


def _top_k_lower_index(scores, k):
    """(values, positions) of the top k under SPEC §4.1's order."""
    _, positions = lax.top_k(_rank_keys(scores), k)
    return jnp.take_along_axis(scores, positions, axis=-1), positions


def _product_key_topk(cfg, s_left, s_right):
    """Two-stage product-key search with the SPEC §4 tie rule; (T, heads, topk) expert indices."""
    k, n = cfg.topk, cfg.n_keys
    top_left, pos_left = _top_k_lower_index(s_left, k)
    top_right, pos_right = _top_k_lower_index(s_right, k)
    # With each side's winners in ascending sub-key order, the left-major k*k candidates
    # ascend in expert index (left * n + right), so top_k's lower-position-first rule on
    # equal sums is exactly the lower-expert-index rule.
    pos_left, top_left = lax.sort((pos_left, top_left), num_keys=1)
    pos_right, top_right = lax.sort((pos_right, top_right), num_keys=1)
    lead = s_left.shape[:-1]
    sums = (top_left[..., :, None] + top_right[..., None, :]).reshape(lead + (k * k,))
    experts = (pos_left.astype(index_dtype())[..., :, None] * n + pos_right[..., None, :]).reshape(lead + (k * k,))
    _, best = lax.top_k(_rank_keys(sums), k)
    return jnp.take_along_axis(experts, best, axis=-1)


# ---------------------------------------------------------------------------- experts

@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _experts(activation, chunk, low, x, indices, weights, down, up, bias, gate):
    """y[t] = sum_{h,k} weights * act(x[t] . down[i] + bias[i]) * up[i], i = indices[t, h, k],
    with act(...) times the linear gate x[t] . gate[i] when ``gate`` is given (SPEC §3.10).

    Tokens are processed in chunks so gathered rows never exceed (chunk, heads, topk, d);
    the custom backward recomputes each chunk's gathers instead of letting autodiff keep
    every chunk's, and scatter-adds the row gradients into (n_experts, d) accumulators.
    With ``low`` (the mixed mode's dtype name) the gathered rows of down, gate and up are
    rounded to it as they are read; their gradients treat the rounding as the identity (SPEC §10.3).
    """
    return _experts_forward(activation, chunk, low, x, indices, weights, down, up, bias, gate)


def _experts_saving_inputs(activation, chunk, low, x, indices, weights, down, up, bias, gate):
    # Residuals are the inputs themselves: no gathered rows are kept for the backward.
    y = _experts_forward(activation, chunk, low, x, indices, weights, down, up, bias, gate)
    return y, (x, indices, weights, down, up, bias, gate)


def _experts_recomputing(activation, chunk, low, residuals, dy):
    dx, d_weights, d_down, d_up, d_bias, d_gate = _experts_backward(activation, chunk, low, *residuals, dy)
    return dx, None, d_weights, d_down, d_up, d_bias, d_gate


_experts.defvjp(_experts_saving_inputs, _experts_recomputing)


def _chunked(chunk, arrays):
    """Pad the token axis to a multiple of ``chunk`` and split it: (n_chunks, chunk, ...)."""
    tokens = arrays[0].shape[0]
    padded = -(-tokens // chunk) * chunk
    return [jnp.pad(a, [(0, padded - tokens)] + [(0, 0)] * (a.ndim - 1)).reshape((-1, chunk) + a.shape[1:])
            for a in arrays]


def _experts_forward(activation, chunk, low, x, indices, weights, down, up, bias, gate):
    act = _ACTIVATIONS[activation]

    def one_chunk(args):
        x_c, idx_c, w_c = args
        pre = jnp.einsum("td,thkd->thk", x_c, _read(down[idx_c], low), precision=HIGHEST)
        if bias is not None:
            pre = pre + bias[idx_c]
        hidden = act(pre)
        if gate is not None:
            hidden = hidden * jnp.einsum("td,thkd->thk", x_c, _read(gate[idx_c], low), precision=HIGHEST)
        return jnp.einsum("thk,thko->to", w_c * hidden, _read(up[idx_c], low), precision=HIGHEST)

    tokens = x.shape[0]
    if tokens <= chunk:
        return one_chunk((x, indices, weights))
    # Padded tokens have weight 0 and x 0, so they add exactly nothing anywhere.
    y = lax.map(one_chunk, tuple(_chunked(chunk, [x, indices, weights])))
    return y.reshape(-1, up.shape[1])[:tokens]


def _experts_backward(activation, chunk, low, x, indices, weights, down, up, bias, gate, dy):
    act = _ACTIVATIONS[activation]

    def one_chunk(acc, args):
        d_down, d_up, d_bias, d_gate = acc
        x_c, idx_c, w_c, dy_c = args
        down_rows, up_rows = _read(down[idx_c], low), _read(up[idx_c], low)
        pre = jnp.einsum("td,thkd->thk", x_c, down_rows, precision=HIGHEST)
        if bias is not None:
            pre = pre + bias[idx_c]
        activated, act_vjp = jax.vjp(act, pre)
        d_coef = jnp.einsum("to,thko->thk", dy_c, up_rows, precision=HIGHEST)
        d_hidden = d_coef * w_c
        rows = idx_c.reshape(-1)
        if gate is None:
            hidden = activated
            (d_pre,) = act_vjp(d_hidden)
            dx_c = jnp.einsum("thk,thkd->td", d_pre, down_rows, precision=HIGHEST)
        else:
            gate_rows = _read(gate[idx_c], low)
            gate_values = jnp.einsum("td,thkd->thk", x_c, gate_rows, precision=HIGHEST)
            hidden = activated * gate_values
            (d_pre,) = act_vjp(d_hidden * gate_values)
            d_gate_values = d_hidden * activated
            dx_c = (jnp.einsum("thk,thkd->td", d_pre, down_rows, precision=HIGHEST)
                    + jnp.einsum("thk,thkd->td", d_gate_values, gate_rows, precision=HIGHEST))
            d_gate = d_gate.at[rows].add(
                (d_gate_values[..., None] * x_c[:, None, None, :]).reshape(rows.shape[0], gate.shape[1]))
        # Explicit widths (not -1): a chunk may hold zero tokens.
        d_down = d_down.at[rows].add((d_pre[..., None] * x_c[:, None, None, :]).reshape(rows.shape[0], down.shape[1]))
        d_up = d_up.at[rows].add(((w_c * hidden)[..., None] * dy_c[:, None, None, :]).reshape(rows.shape[0], up.shape[1]))
        if bias is not None:
            d_bias = d_bias.at[rows].add(d_pre.reshape(-1))
        return (d_down, d_up, d_bias, d_gate), (dx_c, d_coef * hidden)

    zeros = lambda a: None if a is None else jnp.zeros_like(a)  # noqa: E731
    acc = (jnp.zeros_like(down), jnp.zeros_like(up), zeros(bias), zeros(gate))
    tokens = x.shape[0]
    if tokens <= chunk:
        (d_down, d_up, d_bias, d_gate), (dx, d_weights) = one_chunk(acc, (x, indices, weights, dy))
    else:
        (d_down, d_up, d_bias, d_gate), (dx, d_weights) = lax.scan(
            one_chunk, acc, tuple(_chunked(chunk, [x, indices, weights, dy])))
        dx = dx.reshape(-1, x.shape[1])[:tokens]
        d_weights = d_weights.reshape((-1,) + weights.shape[1:])[:tokens]
    return dx, d_weights, d_down, d_up, d_bias, d_gate


_forward_jit = jax.jit(_forward, static_argnums=(0, 1), static_argnames=("low", "implementation"))
_vjp_jit = jax.jit(_vjp, static_argnums=(0, 1), static_argnames=("low", "implementation"))
