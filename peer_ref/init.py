"""Parameter and state initialisation (SPEC §8)."""

from __future__ import annotations

import numpy as np

from .checks import check_dtype_name, state_dtype
from .config import PEERConfig


def init_std(cfg: PEERConfig) -> dict[str, float]:
    """Standard deviation of each normally initialised parameter (zero-mean).

    Parameters absent here are constant: scales start at 1, offsets and biases at 0.
    """
    stds = {
        "query.kernel": cfg.d_model**-0.5,  # unit-variance queries for unit-variance x
        "keys.left": cfg.d_half**-0.5,  # unit-variance sub-key scores for unit queries
        "keys.right": cfg.d_half**-0.5,
        "experts.down": cfg.d_model**-0.5,  # unit-variance expert pre-activations
        # A unit-variance gate independent of the pre-activation: E[(act(z) g)^2] = E[act(z)^2],
        # so a GLU layer starts at the output scale of the plain one (SPEC §8).
        "experts.gate": cfg.d_model**-0.5,
        "experts.up": (cfg.heads * cfg.topk) ** -0.5,  # fan-in of the h*k-wide assembled MLP
    }
    return {name: std for name, std in stds.items() if name in cfg.param_shapes()}


def init_constant(cfg: PEERConfig) -> dict[str, float]:
    """Value of each constant-initialised parameter or state entry."""
    values = {
        "query.bias": 0.0,
        "query_norm.scale": 1.0,
        "query_norm.offset": 0.0,
        "experts.bias": 0.0,
        "query_norm.mean": 0.0,
        "query_norm.var": 1.0,
    }
    present = set(cfg.param_shapes()) | set(cfg.state_shapes())
    return {name: value for name, value in values.items() if name in present}


def init(cfg: PEERConfig, seed: int = 0, dtype: str = "float64") -> tuple[dict, dict]:
    """Fresh ``(params, state)`` as dicts of NumPy arrays keyed by canonical names."""
    check_dtype_name(dtype, ("float64", "float32"))
    rng = np.random.default_rng(seed)
    stds = init_std(cfg)
    constants = init_constant(cfg)
    params = {}
    for name, shape in cfg.param_shapes().items():
        if name in stds:
            params[name] = (rng.standard_normal(shape) * stds[name]).astype(dtype)
        else:
            params[name] = np.full(shape, constants[name], dtype=dtype)
    s_dtype = state_dtype(dtype)
    state = {name: np.full(shape, constants[name], dtype=s_dtype) for name, shape in cfg.state_shapes().items()}
    return params, state
