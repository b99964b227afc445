"""PEER-pytorch 0.2.2 (lucidrains) as the outside baseline, mapped onto a bench case.

The constructor mapping is the conformance adapter's (``peer_conformance.adapters.peer_pytorch``,
where it is explained and checked against the reference). It differs from the layer we time in
ways the mapping cannot remove: per-head keys (we share keys across heads), no query batch norm,
no expert bias, and (b, n, h, k, d) gathers of both expert tables.
"""

from __future__ import annotations

from peer_conformance.adapters import peer_pytorch as adapter

from .presets import BenchCase

DIFFERENCES = (
    "per-head keys (ours: shared)",
    "no query batch norm (ours: batch norm)",
    "no expert bias (ours: bias)",
    "gathers (b,n,h,k,d) tables (ours: backend-specific)",
)


def mapping(case: BenchCase) -> dict:
    """Constructor arguments of PEER-pytorch for `case` (GELU, as the layer we time)."""
    return adapter.arguments(case.d_model, case.heads, case.n_experts, case.topk, case.d_key)


def module(case: BenchCase, fw, seed: int):
    """PEER-pytorch's module for `case` (GELU), drawn after ``torch.manual_seed(seed)``, on the
    worker's device in the case's dtype. `fw` is the worker's set-up Torch framework."""
    torch = fw.torch
    from PEER_pytorch import PEER

    kwargs = mapping(case)
    kwargs["activation"] = adapter.activation_class("gelu")
    torch.manual_seed(seed)
    dtype = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}[case.dtype]
    return PEER(**kwargs).to(device=fw.device, dtype=dtype)


def build(case: BenchCase, fw, seed: int, x, dy, mode: str):
    """A zero-argument callable running PEER-pytorch on x (tokens, d_model) in `mode`.

    `fw` is the worker's set-up Torch framework (device, dtype conversion)."""
    torch = fw.torch
    model = module(case, fw, seed)
    x = x[None]  # it takes (batch, sequence, dim)
    if mode == "forward":
        return lambda: model(x)
    params = list(model.parameters())
    x = x.detach().requires_grad_(True)
    return lambda: torch.autograd.grad(model(x), [x] + params, dy[None])
