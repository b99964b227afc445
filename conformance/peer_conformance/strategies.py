"""Hypothesis strategies: small building blocks, then composite strategies returning NamedTuples.

Sizes are capped so one example runs in milliseconds. Config strategies sometimes omit a
keyword so that the defaults of PEERConfig are exercised too.

Compiled backends (jax.jit, XLA) specialise on every config and shape, and a fresh
specialisation costs them far more than the check itself. So calls (``cases``) draw their
config from ``POOL`` — a fixed set chosen to cover every option value — and their leading
shape from ``POOL_LEADS``, while data, masks and modes vary freely; compiled functions are
then reused across examples. The ``thorough`` profile draws fully random configs and shapes.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st

import peer_ref
from peer_ref import PEERConfig

MAX_TOKENS = 12

# --- building blocks ----------------------------------------------------------------------
n_keys = st.integers(1, 6)
heads = st.integers(1, 3)
d_key = st.integers(1, 4).map(lambda half: 2 * half)
d_model = st.integers(1, 8)
seeds = st.integers(0, 2**32 - 1)
leading_shapes = st.one_of(
    st.just(()),
    st.tuples(st.integers(0, MAX_TOKENS)),
    st.tuples(st.integers(1, 3), st.integers(0, 4)),
)

_OPTIONS = {
    "d_out": st.integers(1, 8),
    "shared_keys": st.booleans(),
    "query_norm": st.sampled_from(peer_ref.QUERY_NORMS),
    "bn_momentum": st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    "bn_eps": st.sampled_from([1e-5, 1e-3, 0.1]),
    "query_bias": st.booleans(),
    "activation": st.sampled_from(peer_ref.ACTIVATIONS),
    "score": st.sampled_from(peer_ref.SCORES),
    "expert_bias": st.booleans(),
    "expert_glu": st.booleans(),
}


POOL = [
    PEERConfig(d_model=8, n_experts=16, heads=2, topk=3, d_key=4),  # every default
    PEERConfig(
        d_model=5,
        n_experts=25,
        heads=3,
        topk=2,
        d_key=6,
        d_out=4,
        shared_keys=False,
        query_bias=True,
        activation="silu",
        score="sigmoid",
        expert_bias=False,
        bn_momentum=0.5,
        bn_eps=1e-3,
        expert_glu=True,
    ),
    PEERConfig(
        d_model=6,
        n_experts=9,
        heads=1,
        topk=3,
        d_key=2,
        query_norm="none",
        activation="relu",
        score="none",
        expert_glu=True,
    ),
    PEERConfig(
        d_model=3, n_experts=36, heads=2, topk=1, d_key=8, d_out=7, activation="gelu_tanh", bn_momentum=1.0, bn_eps=0.1
    ),
    PEERConfig(
        d_model=7,
        n_experts=1,
        heads=2,
        topk=1,
        d_key=2,
        shared_keys=False,
        query_norm="none",
        query_bias=True,
        activation="identity",
        score="softmax",
    ),
    PEERConfig(
        d_model=4,
        n_experts=16,
        heads=3,
        topk=4,
        d_key=4,
        d_out=2,
        shared_keys=False,
        activation="gelu",
        score="none",
        bn_momentum=0.0,
        expert_bias=False,
    ),
]
POOL_LEADS = [(2, 3)]


def _thorough() -> bool:
    return settings.get_current_profile_name() == "thorough"


def call_configs(**fixed):
    """Configs for whole calls: the pool (filtered by ``fixed``), or random ones when thorough."""
    if _thorough():
        return configs(**fixed)
    matching = [cfg for cfg in POOL if all(getattr(cfg, k) == v for k, v in fixed.items())]
    if not matching:
        raise ValueError(f"no pooled config has {fixed}")
    return st.sampled_from(matching)


@st.composite
def configs(draw, **fixed) -> PEERConfig:
    """A valid PEERConfig; ``fixed`` pins fields. Each optional field is sometimes left to its default."""
    keys = draw(n_keys)
    kwargs = {
        "d_model": draw(d_model),
        "n_experts": keys * keys,
        "heads": draw(heads),
        "topk": draw(st.integers(1, keys)),
        "d_key": draw(d_key),
    }
    for name, strategy in _OPTIONS.items():
        if draw(st.booleans()):
            kwargs[name] = draw(strategy)
    kwargs.update(fixed)
    return PEERConfig(**kwargs)


class Case(NamedTuple):
    """One call of the layer: config, float64 params/state (NumPy), inputs and mode."""

    cfg: PEERConfig
    params: dict
    state: dict
    x: np.ndarray
    mask: np.ndarray | None
    dy: np.ndarray
    training: bool
    seed: int

    def describe(self) -> str:
        lead = self.x.shape[:-1]
        return f"cfg={self.cfg}, lead={lead}, training={self.training}, mask={self.mask is not None}, seed={self.seed}"


def perturbed_state(cfg: PEERConfig, rng: np.random.Generator) -> dict:
    """Non-trivial running statistics (so evaluation mode is not an identity)."""
    return {
        name: (rng.standard_normal(shape) * 0.5 if name.endswith("mean") else rng.uniform(0.25, 2.0, shape))
        for name, shape in cfg.state_shapes().items()
    }


def perturbed_params(cfg: PEERConfig, seed: int) -> dict:
    """Reference init plus noise, so that scales, offsets and biases are not constants."""
    params, _ = peer_ref.init(cfg, seed=seed % 2**32)
    rng = np.random.default_rng(seed + 1)
    return {name: value + 0.2 * rng.standard_normal(value.shape) for name, value in params.items()}


@st.composite
def cases(draw, cfg=None, training=None, masked=None, lead=None, **fixed) -> Case:
    """A complete call. ``masked`` None = sometimes; ``lead`` pins the leading shape."""
    cfg = draw(call_configs(**fixed)) if cfg is None else cfg
    seed = draw(seeds)
    rng = np.random.default_rng(seed)
    if lead is None:
        lead = draw(leading_shapes if _thorough() else st.sampled_from(POOL_LEADS))
    x = rng.standard_normal(lead + (cfg.d_model,))
    use_mask = draw(st.booleans()) if masked is None else masked
    mask = rng.random(lead) < 0.7 if use_mask else None
    dy = rng.standard_normal(lead + (cfg.d_out,))
    train = draw(st.booleans()) if training is None else training
    return Case(cfg, perturbed_params(cfg, seed), perturbed_state(cfg, rng), x, mask, dy, train, seed)


@st.composite
def tied_cases(draw, training=False) -> Case:
    """Exact ties by construction: integer-valued queries and keys give integer scores, exactly
    representable in every dtype, so every backend must break ties by the index rule (SPEC §4.1)."""
    cfg = draw(st.sampled_from(TIED_POOL) if not _thorough() else _tied_configs())
    seed = draw(seeds)
    rng = np.random.default_rng(seed)
    params, state = peer_ref.init(cfg, seed=seed)
    # The query kernel picks input coordinates (0/1 entries), so queries are small integers.
    kernel = np.zeros((cfg.d_model, cfg.d_query))
    kernel[rng.integers(0, cfg.d_model, cfg.d_query), np.arange(cfg.d_query)] = 1.0
    params["query.kernel"] = kernel
    for side in ("keys.left", "keys.right"):
        params[side] = rng.integers(-1, 2, params[side].shape).astype(np.float64)
    lead = draw(st.sampled_from(POOL_LEADS)) if not _thorough() else (draw(st.integers(1, 6)),)
    x = rng.integers(-2, 3, lead + (cfg.d_model,)).astype(np.float64)
    dy = rng.standard_normal(lead + (cfg.d_out,))
    return Case(cfg, params, state, x, None, dy, training, seed)


@st.composite
def _tied_configs(draw) -> PEERConfig:
    keys = draw(st.integers(2, 5))
    return PEERConfig(
        d_model=draw(st.integers(2, 6)),
        n_experts=keys * keys,
        heads=draw(heads),
        topk=draw(st.integers(1, keys)),
        d_key=draw(d_key),
        shared_keys=draw(st.booleans()),
        query_norm="none",
    )


TIED_POOL = [
    PEERConfig(d_model=4, n_experts=16, heads=2, topk=3, d_key=4, query_norm="none"),
    PEERConfig(d_model=3, n_experts=25, heads=3, topk=5, d_key=2, shared_keys=False, query_norm="none"),
    PEERConfig(d_model=6, n_experts=9, heads=1, topk=2, d_key=6, query_norm="none"),
]

# Tests of secondary rules take fewer examples than the core properties (forward, gradients,
# routing), whose count the profile sets (200 in ci).
SECONDARY = settings(max_examples=min(30, settings.default.max_examples))
PATHS = settings(max_examples=min(20, settings.default.max_examples))
# Properties fixed by the config and mode rather than by the data (output and gradient dtypes):
# a wrong dtype shows on any example of its config, so about two draws per pooled config suffice.
STRUCTURE = settings(max_examples=min(12, settings.default.max_examples))
