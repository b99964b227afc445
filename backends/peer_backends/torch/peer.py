"""PEER in PyTorch: init, apply and vjp (SPEC §3, §7, §8) on validated tensors.

The parts live in modules named after the spec's: query_norm (§3.3), routing (§3.4-§3.9, §4),
experts (§3.10-§3.11, implementation "aten"), kernels (the same in Triton kernels, implementation
"triton"); this module validates, assembles the forward pass,
compiles it (torch.compile) and differentiates it (torch.autograd).
"""

import functools

import numpy as np
import torch

import peer_ref
from peer_ref import checks
from peer_ref.errors import PEERInputError

from .._implementation import choose
from . import kernels
from .core import RoundThrough, dtype_name, torch_dtype
from .experts import expert_stage
from .routing import route

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
        p["query.kernel"] = RoundThrough.apply(p["query.kernel"], low)
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
        y = expert_stage(cfg, p, xf, flat, weights.reshape(flat.shape), low)
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
