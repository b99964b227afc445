"""PEER as pure JAX functions: init, apply (jax.jit-compiled by default) and vjp (jax.vjp).

The parts live in modules named after the spec's: query_norm (§3.3), routing (§3.4-§3.9, §4),
experts (§3.10-§3.11, implementation "xla"); this module validates and assembles them.

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
import peer_ref
from peer_ref import checks
from peer_ref.errors import PEERInputError

from .._implementation import choose
from .core import DTYPES, dtype_name, require_x64, round_through
from .experts import _ROWS_PER_CHUNK, _experts
from .routing import route

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
            params[name] = draw.astype(DTYPES[dtype])
        else:
            params[name] = jnp.full(shape, constants[name], DTYPES[dtype])
    state_dtype = DTYPES[checks.state_dtype(dtype)]
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

def _forward(cfg, training, params, state, x, mask, routing, low=None, implementation="xla"):
    """``peer_ref.forward`` in JAX; cfg, training, low (the mixed mode's dtype name) and the
    implementation name of the expert stage are static."""
    out_dtype = x.dtype
    # bfloat16/float16 policy (SPEC §10.1, §10.3): upcast once, compute in float32, round the outputs once.
    compute = jnp.float32 if out_dtype in (jnp.bfloat16, jnp.float16) else out_dtype
    p = {name: value.astype(compute) for name, value in params.items()}
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


_forward_jit = jax.jit(_forward, static_argnums=(0, 1), static_argnames=("low", "implementation"))
_vjp_jit = jax.jit(_vjp, static_argnums=(0, 1), static_argnames=("low", "implementation"))
