"""PEER-pytorch 0.2.2 (lucidrains, ``pip install PEER-pytorch``) behind the backend contract.

    pytest --pyargs peer_conformance --peer-backend peer_conformance.adapters.peer_pytorch

The adapter maps names and layouts and nothing else: every call builds PEER-pytorch's own
``PEER`` module, loads the canonical parameters into it with ``load_state_dict`` and runs its own
``forward``; ``aux`` is read from that forward by hooks on its own submodules (the indices its
expert tables are gathered with, the scores its score activation receives). Errors are the ones
PEER-pytorch and torch raise. The benchmark times the same constructor mapping
(``peer_bench.peer_pytorch``).

Mapping: its ``PEER(dim, heads, num_experts, num_experts_per_head, dim_key, ...)`` projects x to
``2 * heads * dim_key`` columns laid out (half, head, position), so its ``dim_key`` is our
``d_key // 2``; its product-key top-k defaults to ``num_experts_per_head`` (our ``topk``, stage
one of SPEC §3.6 included). Its keys ``(heads, n_keys, 2, dim_key)`` are our per-head
``keys.left`` / ``keys.right``; ``weight_down_embed`` / ``weight_up_embed`` are ``experts.down`` /
``experts.up``. ``non_competing_scores=False`` selects softmax over each head's top-k scores;
its default (``True``: ReLU over the one best candidate of each head) is no score function of
SPEC §3.9, so it is not offered here.

What it lacks is declared in ``options``: shared keys (its keys are per head), the query batch
norm and its state, a query bias, expert biases, GLU experts, ``d_out`` other than ``d_model``,
an odd ``d_model`` (its constructor asserts ``dim % 2 == 0``), masks, a routing override, and
score functions other than softmax. It has one (eager) path, no mixed mode.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import sys

import peer_ref
from peer_backends import options as _options

name = "peer-pytorch"
try:
    version = importlib.metadata.version("PEER-pytorch")
except importlib.metadata.PackageNotFoundError:  # building it then raises ModuleNotFoundError
    version = "not installed"
capabilities = frozenset({"float64", "float32", "bfloat16", "float16", "grad"})
default_path = "eager"
options = {
    "shared_keys": (False,),
    "query_norm": ("none",),
    "query_bias": (False,),
    "score": ("softmax",),
    "expert_bias": (False,),
    "expert_glu": (False,),
    "d_out": ("d_model",),
    "d_model": ("even",),
    "mask": (False,),
    "routing": (False,),
}
# SPEC §3.10's activations as torch.nn modules (PEER-pytorch takes the class, called with no arguments).
ACTIVATIONS = {
    "gelu": "GELU",
    "gelu_tanh": "GELU(approximate='tanh')",
    "relu": "ReLU",
    "silu": "SiLU",
    "identity": "Identity",
}
DTYPES = ("float64", "float32", "bfloat16", "float16")
# Canonical name -> its state_dict name (keys.left and keys.right together make its `keys`).
NAMES = {
    "query.kernel": "to_queries.0.weight",
    "experts.down": "weight_down_embed.weight",
    "experts.up": "weight_up_embed.weight",
}


def arguments(d_model: int, heads: int, n_experts: int, topk: int, d_key: int, activation: str = "gelu") -> dict:
    """PEER-pytorch's constructor arguments for these sizes (the activation as its torch.nn name)."""
    return {
        "dim": d_model,
        "heads": heads,
        "num_experts": n_experts,
        "num_experts_per_head": topk,
        "dim_key": d_key // 2,
        "non_competing_scores": False,
        "activation": f"torch.nn.{ACTIVATIONS[activation]}",
    }


def activation_class(activation: str):
    """The zero-argument torch.nn constructor PEER-pytorch calls for SPEC §3.10's ``activation``."""
    import functools

    import torch

    if activation == "gelu_tanh":
        return functools.partial(torch.nn.GELU, approximate="tanh")
    return getattr(torch.nn, ACTIVATIONS[activation])


def build(cfg: peer_ref.PEERConfig, device=None):
    """PEER-pytorch's module for ``cfg`` (its own initialisation; ``device="meta"`` allocates nothing).

    Raises PEERConfigError naming the first option of ``cfg`` it does not support."""
    missing = _options.unsupported(_options.supported(sys.modules[__name__]), cfg)
    if missing:
        raise peer_ref.PEERConfigError(f"PEER-pytorch has no {_options.describe(missing)} (see options)")
    import torch
    from PEER_pytorch import PEER

    kwargs = arguments(cfg.d_model, cfg.heads, cfg.n_experts, cfg.topk, cfg.d_key)
    kwargs["activation"] = activation_class(cfg.activation)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return PEER(**kwargs)


# --- layouts --------------------------------------------------------------------------------


def _to_theirs(cfg, tree: dict) -> dict:
    """Canonical names and layouts -> PEER-pytorch's state_dict (names it does not know pass
    through unchanged, for its load_state_dict to judge)."""
    import torch

    out = {}
    rest = dict(tree)
    kernel = rest.pop("query.kernel", None)
    if kernel is not None:
        half = cfg.d_key // 2
        fits = tuple(kernel.shape) == (cfg.d_model, cfg.d_query)
        out[NAMES["query.kernel"]] = (
            kernel.reshape(cfg.d_model, cfg.heads, 2, half).permute(2, 1, 3, 0).reshape(-1, cfg.d_model)
            if fits
            else kernel
        )
    if "keys.left" in rest and "keys.right" in rest and rest["keys.left"].shape == rest["keys.right"].shape:
        out["keys"] = torch.stack([rest.pop("keys.left"), rest.pop("keys.right")], dim=2)
    for canonical in ("experts.down", "experts.up"):
        if canonical in rest:
            out[NAMES[canonical]] = rest.pop(canonical)
    out.update(rest)
    return out


def _to_canonical(cfg, tree: dict) -> dict:
    """PEER-pytorch's state_dict names and layouts -> canonical ones."""
    half = cfg.d_key // 2
    kernel = tree["to_queries.0.weight"].reshape(2, cfg.heads, half, cfg.d_model)
    return {
        "query.kernel": kernel.permute(3, 1, 0, 2).reshape(cfg.d_model, cfg.d_query),
        "keys.left": tree["keys"][:, :, 0],
        "keys.right": tree["keys"][:, :, 1],
        "experts.down": tree["weight_down_embed.weight"],
        "experts.up": tree["weight_up_embed.weight"],
    }


# --- the contract -------------------------------------------------------------------------


def init(cfg, seed=0, dtype=None):
    """PEER-pytorch's own initialisation for ``cfg``, drawn from a generator seeded with ``seed``
    (torch's global one is left as it was); canonical names. No state (it has no batch norm)."""
    import torch

    dtype = "float32" if dtype is None else dtype
    if dtype not in DTYPES:
        raise peer_ref.PEERInputError(f"dtype={dtype!r}, but expected one of {list(DTYPES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build(cfg)
    model = model.to(getattr(torch, dtype))
    tree = {k: v.detach() for k, v in model.state_dict().items()}
    return {k: v.contiguous() for k, v in _to_canonical(cfg, tree).items()}, {}


def _refuse_unsupported(mask, routing, compute_dtype, params):
    if mask is not None:
        raise NotImplementedError("PEER-pytorch takes no mask (options['mask'] is (False,))")
    if routing is not None:
        raise NotImplementedError("PEER-pytorch takes no routing override (options['routing'] is (False,))")
    dtypes = {str(v.dtype).removeprefix("torch.") for v in params.values()}
    if compute_dtype is not None and {compute_dtype} != dtypes:
        raise NotImplementedError(f"compute_dtype={compute_dtype!r}: PEER-pytorch has no mixed mode")


def _run(cfg, params, state, x, training):
    """Load the parameters into its module, run its forward on x as (1, tokens, d_model)."""
    model = build(cfg, device="meta")
    model.load_state_dict(_to_theirs(cfg, {**params, **state}), strict=True, assign=True)
    model.train(training)
    seen = {}
    hooks = [
        model.weight_down_embed.register_forward_hook(lambda m, args, out: seen.update(indices=args[0])),
        model.score_activation.register_forward_hook(lambda m, args, out: seen.update(scores=args[0], weights=out)),
    ]
    try:
        lead = tuple(x.shape[:-1])
        y = model(x.reshape(1, -1, x.shape[-1]))
    finally:
        for hook in hooks:
            hook.remove()
    y = y.reshape(*lead, y.shape[-1])
    aux = {k: v.reshape(*lead, *v.shape[-2:]) for k, v in seen.items()}
    return model, y, aux


def apply(
    cfg, params, state, x, training=False, mask=None, routing=None, *, jit=None, compute_dtype=None, implementation=None
):
    _refuse_unsupported(mask, routing, compute_dtype, params)
    import torch

    with torch.no_grad():
        _, y, aux = _run(cfg, params, state, x, training)
    return y, {}, aux


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
):
    _refuse_unsupported(mask, routing, compute_dtype, params)
    import torch

    x = x.detach().requires_grad_(True)
    model, y, _ = _run(cfg, params, state, x, training)
    names = [n for n, _ in model.named_parameters()]
    *grads, dx = torch.autograd.grad(y, [p for _, p in model.named_parameters()] + [x], dy)
    return _to_canonical(cfg, dict(zip(names, grads))), dx


def from_numpy(tree):
    from peer_backends import torch as ours

    return ours.from_numpy(tree)


def to_numpy(tree):
    from peer_backends import torch as ours

    return ours.to_numpy(tree)


def layer(cfg, **kwargs):
    """PEER-pytorch's own module for ``cfg`` (its initialisation; ``kwargs`` go to the module's ``to``)."""
    return build(cfg).to(**kwargs)
