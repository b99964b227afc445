"""SPEC §2 Parameters and state, SPEC §8 Initialisation."""

import numpy as np
import pytest
from hypothesis import given, settings

import peer_ref
from peer_ref import PEERConfig
from peer_ref.checks import state_dtype

from .helpers import assert_dtype, needs
from .strategies import configs, seeds

BIG = PEERConfig(d_model=64, n_experts=32**2, heads=4, topk=8, d_key=32, query_bias=True, expert_glu=True)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16", "float16"])
@settings(max_examples=min(20, settings.default.max_examples))
@given(cfg=configs(), seed=seeds)
def test_init_names_shapes_dtypes(backend, dtype, cfg, seed):
    needs(backend, dtype)
    params, state = backend.to_numpy(backend.init(cfg, seed=seed, dtype=dtype))
    assert set(params) == set(cfg.param_shapes()), (
        f"params names={sorted(params)}, but should be {sorted(cfg.param_shapes())}"
    )
    assert set(state) == set(cfg.state_shapes()), (
        f"state names={sorted(state)}, but should be {sorted(cfg.state_shapes())}"
    )
    for name, shape in {**cfg.param_shapes(), **cfg.state_shapes()}.items():
        value = params.get(name, state.get(name))
        assert np.shape(value) == shape, f"{name}.shape={np.shape(value)}, but should be {shape}"
        assert_dtype(value, dtype if name in params else state_dtype(dtype), what=name)


@pytest.mark.parametrize("name", sorted(peer_ref.init_std(BIG)))
def test_init_distribution(backend, name):
    """Normal(0, std) per SPEC §8: sample mean and std within a few standard errors."""
    params, _ = backend.to_numpy(backend.init(BIG, seed=3, dtype="float32"))
    values = np.asarray(params[name], np.float64).ravel()
    std = peer_ref.init_std(BIG)[name]
    n = values.size
    assert abs(values.mean()) < 6 * std / np.sqrt(n), (
        f"{name} mean={values.mean():.4g}, but should be 0 ± {6 * std / np.sqrt(n):.2g}"
    )
    assert abs(values.std() / std - 1) < 6 / np.sqrt(2 * n) + 0.01, (
        f"{name} std={values.std():.4g}, but should be {std:.4g}"
    )
    kurtosis = np.mean((values / values.std()) ** 4)
    assert abs(kurtosis - 3) < 0.5, f"{name} kurtosis={kurtosis:.3g}, but should be 3 (normal)"


@pytest.mark.parametrize("name", sorted(peer_ref.init_constant(BIG)))
def test_init_constants(backend, name):
    params, state = backend.to_numpy(backend.init(BIG, seed=3, dtype="float32"))
    value = {**params, **state}[name]
    want = peer_ref.init_constant(BIG)[name]
    assert np.all(np.asarray(value, np.float64) == want), f"{name} should be all {want}"


def test_init_is_deterministic_per_seed(backend):
    a, _ = backend.to_numpy(backend.init(BIG, seed=5, dtype="float32"))
    b, _ = backend.to_numpy(backend.init(BIG, seed=5, dtype="float32"))
    c, _ = backend.to_numpy(backend.init(BIG, seed=6, dtype="float32"))
    for name in peer_ref.init_std(BIG):
        assert np.array_equal(a[name], b[name]), f"{name} differs for the same seed"
        assert not np.array_equal(a[name], c[name]), f"{name} is the same for different seeds"


def test_init_rejects_unknown_dtype(backend):
    with pytest.raises(peer_ref.PEERInputError, match="dtype='float8_e4m3fn'"):
        backend.init(BIG, seed=0, dtype="float8_e4m3fn")
