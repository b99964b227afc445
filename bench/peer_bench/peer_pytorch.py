"""PEER-pytorch 0.2.2 (lucidrains) as the outside baseline, mapped onto a bench case.

Its `PEER(dim, heads, num_experts, num_experts_per_head, dim_key, ...)` projects x to
2 * heads * dim_key, so its `dim_key` is our half-query size d_key // 2; its product-key top-k
defaults to num_experts_per_head. `non_competing_scores=False` selects softmax over the top-k
scores (the default, True, is ReLU scores and one expert per head). It differs from the layer we
time in ways the mapping cannot remove: per-head keys (we share keys across heads), no query
batch norm, no expert bias, and (b, n, h, k, d) gathers of both expert tables.
"""

from __future__ import annotations

from .presets import BenchCase

DIFFERENCES = (
    "per-head keys (ours: shared)",
    "no query batch norm (ours: batch norm)",
    "no expert bias (ours: bias)",
    "gathers (b,n,h,k,d) tables (ours: backend-specific)",
)


def mapping(case: BenchCase) -> dict:
    """Constructor arguments of PEER-pytorch for `case`."""
    return {
        "dim": case.d_model,
        "heads": case.heads,
        "num_experts": case.n_experts,
        "num_experts_per_head": case.topk,
        "dim_key": case.d_key // 2,
        "non_competing_scores": False,
        "activation": "torch.nn.GELU",
    }


def build(case: BenchCase, fw, seed: int, x, dy, mode: str):
    """A zero-argument callable running PEER-pytorch on x (tokens, d_model) in `mode`.

    `fw` is the worker's set-up Torch framework (device, dtype conversion)."""
    torch = fw.torch
    from PEER_pytorch import PEER

    kwargs = mapping(case)
    kwargs["activation"] = torch.nn.GELU
    torch.manual_seed(seed)
    dtype = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}[case.dtype]
    model = PEER(**kwargs).to(device=fw.device, dtype=dtype)
    x = x[None]  # it takes (batch, sequence, dim)
    if mode == "forward":
        return lambda: model(x)
    params = list(model.parameters())
    x = x.detach().requires_grad_(True)
    return lambda: torch.autograd.grad(model(x), [x] + params, dy[None])
