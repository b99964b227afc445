"""PEER in PyTorch: init, apply and vjp (SPEC §3, §7, §8) on validated tensors.

The parts live in modules named after the spec's: query_norm (§3.3), routing (§3.4-§3.9, §4),
experts (§3.10-§3.11, implementation "aten"), kernels (the same in Triton kernels, implementation
"triton"), parallel (the same on expert tables sharded by columns, implementation "sharded"); this
module validates, assembles the forward pass once for every implementation (``forward``),
compiles it (torch.compile) and differentiates it (torch.autograd).
"""

import functools
import importlib.util
import os
import sys
import typing
import warnings

import torch

import peer_ref
from peer_ref import checks
from peer_ref.errors import PEERConfigError, PEERInputError

from .._implementation import choose
from . import experts
from .core import meta, native_dtype, round_through, transformed
from .routing import route

# Kernels of the expert stage, the default first: "aten" is PyTorch's own (embedding-bag) kernels
# (peer_backends.torch.experts), "triton" the fused Triton kernels (peer_backends.torch.kernels),
# "sharded" PyTorch's kernels on expert tables sharded by columns as DTensors
# (peer_backends.torch.parallel), chosen by where the tables live.
IMPLEMENTATIONS = ("aten", "triton", "sharded")


def triton_unavailable(device) -> str | None:
    """None where the Triton kernels can run on tensors on ``device``, else why not (triton is
    looked up, not imported)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    device = torch.device(device)
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return (
            "triton kernels run on CUDA devices; on CPU only in Triton's interpreter "
            "(TRITON_INTERPRET=1 in the environment before triton is imported)"
        )
    return f"triton kernels run on CUDA devices, but x is on {device.type!r}"


def sharded_tables(params) -> bool:
    """Whether the expert tables are DTensors (sharded by ``parallel.ExpertColumnParallel``)."""
    module = sys.modules.get("torch.distributed.tensor")  # no DTensor exists before it is imported
    return module is not None and isinstance(params.get("experts.down"), module.DTensor)


def choose_implementation(implementation, device, params=None) -> str:
    """The implementation to run for tensors on ``device`` (see peer_backends._implementation).

    "sharded" runs, and only it, where the expert tables in ``params`` are DTensors; otherwise
    "triton" can run where triton is installed, on CUDA devices, or on CPU in Triton's interpreter
    (TRITON_INTERPRET=1), and None picks it on CUDA devices, "aten" elsewhere.
    """
    device = torch.device(device)
    if params is not None and sharded_tables(params):
        refused = "the expert tables are sharded DTensors, which run 'sharded'"
        return choose("torch", implementation, {"aten": refused, "triton": refused, "sharded": None}, ["sharded"])
    options = {
        "aten": None,
        "triton": triton_unavailable(device),
        "sharded": "the expert tables are not DTensors (shard them with parallel.ExpertColumnParallel)",
    }
    return choose("torch", implementation, options, ["triton", "aten"] if device.type == "cuda" else ["aten"])


class ExpertStage(typing.NamedTuple):
    """An implementation of the expert stage, in the style of ``distribute_module``: ``run`` is
    the stage, (cfg, p, xf, flat, weights, low) -> y (T, d_out); ``inputs`` turns the call's
    (params, x, mask, routing) into what the routing reads, ``output`` y (T, d_out) into the
    call's result, given the params, and ``cotangent`` a whole dy into the layout of that result
    (identities but for "sharded")."""

    run: typing.Callable
    inputs: typing.Callable = lambda cfg, params, x, mask, routing: (params, x, mask, routing)
    output: typing.Callable = lambda params, y: y
    cotangent: typing.Callable = lambda y, dy: dy


def expert_stage_for(implementation) -> ExpertStage:
    """The expert stage of ``implementation``; its module is imported here, so that triton and
    torch.distributed load only when asked for. Under a torch.func transform (core.transformed)
    "aten" and "triton" run experts.gathered_stage, the same math in plain differentiable
    operations that torch.func can transform."""
    if implementation != "sharded" and transformed():
        return ExpertStage(experts.gathered_stage)
    if implementation == "triton":
        from . import kernels

        return ExpertStage(kernels.expert_stage)
    if implementation == "sharded":
        from . import parallel

        return ExpertStage(
            parallel.expert_stage, parallel.local_inputs, parallel.sharded_output, parallel.sharded_cotangent
        )
    return ExpertStage(experts.expert_stage)


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
        params[name] = value.to(device=device, dtype=native_dtype(dtype))
    s_dtype = native_dtype(checks.state_dtype(dtype))
    state = {
        name: torch.full(shape, constants[name], dtype=s_dtype, device=device)
        for name, shape in cfg.state_shapes().items()
    }
    return params, state


def compute_dtype_name(compute_dtype):
    """``compute_dtype`` as a dtype name: a torch.dtype converts, anything else is checked as given."""
    return str(compute_dtype).removeprefix("torch.") if isinstance(compute_dtype, torch.dtype) else compute_dtype


def _routing_range(routing):
    # Under torch.compile the values are checked where they are known, when the graph runs
    # (peer::checked_routing in forward), so that reading them does not break the graph.
    # Under torch.func's vmap the same check runs inside peer::checked_routing, on the batch.
    if torch.compiler.is_compiling() or transformed():
        return None
    return int(routing.min()), int(routing.max())


def validate(cfg, params, state, x, training, mask=None, routing=None, dy=None, compute_dtype=None) -> checks.Arguments:
    """Check every argument through peer_ref.checks (SPEC §9); returns (lead, dtype, low): the
    leading shape of x, the parameters' dtype name and the mixed mode's low dtype name or None."""
    checks.check_trees(cfg, params, state, meta)
    for arg, tree in (("params", params), ("state", state)):
        for key, value in tree.items():
            if not isinstance(value, torch.Tensor):
                raise PEERInputError(f"{arg}[{key!r}] is {type(value).__name__}, but expected a torch.Tensor")
    for arg, value in (("x", x), ("mask", mask), ("routing", routing), ("dy", dy)):
        if value is not None and not isinstance(value, torch.Tensor):
            raise PEERInputError(f"{arg} is {type(value).__name__}, but expected a torch.Tensor")
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


def forward(cfg, training, params, state, x, mask, routing, low=None, implementation="aten", sparse=False):
    """The forward pass on validated tensors (all on x's device): the one assembly of routing and
    expert stage, whatever the implementation.

    Returns (y, new_state, indices, scores, weights) with x flattened to (T, d_model) and the
    routing tensors (T, heads, topk). Arithmetic is float32 for bfloat16 and float16 inputs
    (SPEC §10.1); ``low`` (a torch dtype or None) is the mixed mode's (SPEC §10.3);
    ``implementation`` one of IMPLEMENTATIONS, already checked (choose_implementation);
    ``sparse`` (checked by check_sparse): the expert stage runs on the selected rows of the
    expert tables (experts.selected_tables), whose gradients are then row-sparse (SPEC §7.1).
    """
    stage = expert_stage_for(implementation)
    given = params
    params, x, mask, routing = stage.inputs(cfg, params, x, mask, routing)
    compute = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype
    tables = [name for name in peer_ref.EXPERT_TABLES if name in params] if sparse else []
    p = {name: value.to(compute) for name, value in params.items() if name not in tables}
    if low is not None:
        p["query.kernel"] = round_through(p["query.kernel"], low)
    xf = x.reshape(-1, cfg.d_model).to(compute)
    tokens = xf.shape[0]
    valid = None if mask is None else mask.reshape(tokens)
    if mask is not None:
        xf = torch.where(valid[:, None], xf, 0)  # §5: padding is inert, NaN padding included, in both passes

    new_state, indices, scores, weights = route(cfg, training, p, state, xf, valid, routing)

    flat = indices.reshape(tokens, cfg.heads * cfg.topk)
    if sparse:
        selected = experts.selected_rows(flat, cfg.n_experts, valid)
        p.update(experts.selected_tables(params, tables, selected, compute))
        y = stage.run(cfg, p, xf, selected.compact, weights.reshape(flat.shape), low, groups=selected.groups)
    else:
        y = stage.run(cfg, p, xf, flat, weights.reshape(flat.shape), low)
    if mask is not None:
        y = torch.where(valid[:, None], y, 0)  # §5: masked tokens output exactly zero
    return stage.output(given, y.to(x.dtype)), new_state, indices, scores, weights


_COMPILED: dict = {}


def forward_tensors(*args, **kwargs):
    """Deprecated: ``forward`` (the name of the forward's one assembly in every backend)."""
    warnings.warn(
        "peer_backends.torch.peer.forward_tensors is deprecated; use forward", DeprecationWarning, stacklevel=2
    )
    return forward(*args, **kwargs)


def clear_caches():
    """Drop the compiled forward functions (one per config, training flag and argument set)."""
    _COMPILED.clear()


def check_sparse(sparse, implementation, jit=None) -> bool:
    """``sparse=`` (SPEC §7.1) as a bool, checked against where row-sparse gradients run: not
    the functional API's compiled path (``jit=True``), outside torch.func transforms, on whole
    expert tables (not implementation "sharded"). (``torch.compile`` of a layer with
    sparse=True runs: the row selection, whose size depends on the data, breaks the graph.)

    Raises:
      PEERInputError: ``sparse`` is not a bool (peer_ref.checks.check_flag).
      PEERConfigError: sparse=True where it cannot run.
    """
    if not checks.check_flag("sparse", sparse):
        return False
    if implementation == "sharded":
        raise PEERConfigError(
            "sparse=True with expert tables sharded as DTensors (implementation 'sharded'), but expected whole "
            "tables: row-sparse gradients of sharded tables are not supported; use sparse=False"
        )
    if jit:
        raise PEERConfigError(
            f"sparse=True with jit={jit!r}, but expected jit=None or False: the compiled functional path "
            "specialises every size but the tokens', and the number of gradient rows changes with every "
            "call; run eagerly, or torch.compile a layer built with sparse=True"
        )
    if transformed():
        raise PEERConfigError(
            "sparse=True under a torch.func transform, but expected a plain autograd call: torch.func "
            "does not produce sparse gradients; use sparse=False under torch.func"
        )
    return True


def _runner(cfg, training, has_mask, has_routing, jit, low=None, implementation="aten", sparse=False):
    low = None if low is None else native_dtype(low)
    run = functools.partial(forward, cfg, training, low=low, implementation=implementation, sparse=sparse)
    if not jit:
        return run
    key = (cfg, training, has_mask, has_routing, low, implementation, sparse)
    if key not in _COMPILED:
        _COMPILED[key] = _dynamic_tokens(cfg, torch.compile(run))
    return _COMPILED[key]


def _dynamic_tokens(cfg, compiled):
    """Call compiled with x, mask and routing flattened to one token dimension, marked dynamic:
    one graph serves every leading shape. Dynamo specialises a dimension of size 0 or 1, so
    calls with 0 tokens and with 1 token compile a graph of their own."""

    def run(params, state, x, mask, routing):
        flat = [
            x.reshape(-1, cfg.d_model),
            None if mask is None else mask.reshape(-1),
            None if routing is None else routing.reshape(-1, cfg.heads, cfg.topk),
        ]
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
    def move(value):
        return None if value is None else value.to(device)

    return ({k: move(v) for k, v in params.items()}, {k: move(v) for k, v in state.items()}, move(mask), move(routing))


def routing_aux(cfg, lead, indices, scores, weights):
    shape = lead + (cfg.heads, cfg.topk)
    return {
        "indices": indices.detach().reshape(shape),
        "scores": scores.detach().reshape(shape),
        "weights": weights.detach().reshape(shape),
    }


def apply(
    cfg, params, state, x, training=False, mask=None, routing=None, *, jit=None, compute_dtype=None, implementation=None
):
    lead, _, low = validate(cfg, params, state, x, training, mask, routing, compute_dtype=compute_dtype)
    implementation = choose_implementation(implementation, x.device, params)
    params, state, mask, routing = _to_device(x.device, params, state, mask, routing)
    run = _runner(cfg, bool(training), mask is not None, routing is not None, jit, low, implementation)
    y, new_state, indices, scores, weights = run(params, state, x, mask, routing)
    new_state = {name: value.detach() for name, value in new_state.items()}
    return y.reshape(lead + (cfg.d_out,)), new_state, routing_aux(cfg, lead, indices, scores, weights)


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
    """(grads, dx): the cotangents of sum(y * dy) (SPEC §7) by torch.autograd; see the backend
    contract (peer_backends.contract). With ``sparse=True`` (SPEC §7.1) the gradients of the
    expert tables present (``peer_ref.EXPERT_TABLES``: experts.down, experts.up, experts.gate,
    experts.bias) are coalesced sparse COO tensors of the tables' shape and dtype (float32 in
    the mixed mode), as ``nn.Embedding(sparse=True)`` gives: indices (1, U) int64, the experts
    selected by valid tokens (or the routing override), sorted and unique; values (U, d), (U,)
    for the bias. The other gradients and dx are dense and unchanged. Raises PEERInputError for
    a ``sparse`` that is not a bool, PEERConfigError for sparse=True with ``jit=True``, under a
    torch.func transform or on sharded tables (check_sparse)."""
    checks.check_flag("sparse", sparse)
    lead, _, low = validate(cfg, params, state, x, training, mask, routing, dy, compute_dtype=compute_dtype)
    implementation = choose_implementation(implementation, x.device, params)
    sparse = check_sparse(sparse, implementation, jit)
    params, state, mask, routing = _to_device(x.device, params, state, mask, routing)
    leaves = {name: value.detach().requires_grad_(True) for name, value in params.items()}
    x_leaf = x.detach().requires_grad_(True)
    run = _runner(cfg, bool(training), mask is not None, routing is not None, jit, low, implementation, sparse)
    with torch.enable_grad():
        y = run(leaves, state, x_leaf, mask, routing)[0]
        # The cotangent of sum(y * dy) with respect to y is dy itself.
        *d_params, dx = torch.autograd.grad(
            y,
            [*leaves.values(), x_leaf],
            grad_outputs=expert_stage_for(implementation).cotangent(y, dy.reshape(y.shape).to(y.device)),
            allow_unused=True,
            materialize_grads=True,
        )
    return dict(zip(leaves, d_params)), dx.reshape(lead + (cfg.d_model,))
