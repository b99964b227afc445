"""Parameter and state initialisation (SPEC §8): distributions, determinism, dtypes."""

from __future__ import annotations

import numpy as np
import pytest

import peer_ref

# Every normal parameter has at least 2048 entries here, so the sample std is within
# ~1.6% (one standard error) of the target; 6 standard errors makes a false failure negligible.
LARGE = peer_ref.PEERConfig(
    d_model=64,
    n_experts=1024,
    heads=4,
    topk=8,
    d_key=32,
    d_out=48,
    shared_keys=False,
    query_bias=True,
    expert_bias=True,
    expert_glu=True,
)
SIGMAS = 6.0


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_normal_parameters_match_init_std(dtype):
    params, _ = peer_ref.init(LARGE, seed=123, dtype=dtype)
    stds = peer_ref.init_std(LARGE)
    assert set(stds) <= set(params)
    for name, std in stds.items():
        values = params[name].astype(np.float64).ravel()
        n = values.size
        assert abs(values.mean()) <= SIGMAS * std / np.sqrt(n), (
            f"params[{name!r}].mean()={values.mean():.4g}, but should be 0 within {SIGMAS} standard errors"
        )
        rel = values.std() / std - 1
        assert abs(rel) <= SIGMAS / np.sqrt(2 * n), (
            f"params[{name!r}].std()={values.std():.4g}, but should be {std:.4g} within {SIGMAS} standard errors"
        )


def test_init_std_values():
    stds = peer_ref.init_std(LARGE)
    assert stds == pytest.approx(
        {
            "query.kernel": 64**-0.5,
            "keys.left": 16**-0.5,
            "keys.right": 16**-0.5,
            "experts.down": 64**-0.5,
            "experts.gate": 64**-0.5,
            "experts.up": 32**-0.5,
        }
    )


def test_constant_parameters_and_state_match_init_constant():
    params, state = peer_ref.init(LARGE, seed=0)
    constants = peer_ref.init_constant(LARGE)
    assert set(constants) == {
        "query.bias",
        "query_norm.scale",
        "query_norm.offset",
        "experts.bias",
        "query_norm.mean",
        "query_norm.var",
    }
    for name, value in constants.items():
        tree = params if name in params else state
        assert np.all(tree[name] == value), f"{name} should be all {value}"
    assert set(params) == set(peer_ref.init_std(LARGE)) | (set(constants) & set(params))


def test_every_parameter_is_covered_exactly_once():
    for options in ({}, {"query_norm": "none", "query_bias": True, "expert_bias": False, "expert_glu": True}):
        cfg = peer_ref.PEERConfig(d_model=4, n_experts=9, heads=2, topk=2, d_key=4, **options)
        stds, constants = peer_ref.init_std(cfg), peer_ref.init_constant(cfg)
        names = set(cfg.param_shapes()) | set(cfg.state_shapes())
        assert not (set(stds) & set(constants))
        assert set(stds) | set(constants) == names, f"{sorted(names)} vs {sorted(stds)} + {sorted(constants)}"
        params, state = peer_ref.init(cfg)
        assert {k: v.shape for k, v in params.items()} == cfg.param_shapes()
        assert {k: v.shape for k, v in state.items()} == cfg.state_shapes()


def test_deterministic_per_seed():
    cfg = peer_ref.PEERConfig(d_model=4, n_experts=16, heads=2, topk=2, d_key=4, shared_keys=False)
    first, _ = peer_ref.init(cfg, seed=42)
    again, _ = peer_ref.init(cfg, seed=42)
    other, _ = peer_ref.init(cfg, seed=43)
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
    assert any(not np.array_equal(first[n], other[n]) for n in peer_ref.init_std(cfg))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_dtype_option(dtype):
    params, state = peer_ref.init(LARGE, seed=1, dtype=dtype)
    for tree in (params, state):
        for name, value in tree.items():
            assert value.dtype == np.dtype(dtype), f"{name}.dtype={value.dtype}, but should be {dtype}"


def test_default_dtype_is_float64():
    params, state = peer_ref.init(LARGE)
    assert all(v.dtype == np.float64 for v in (*params.values(), *state.values()))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "int32"])
def test_reference_rejects_other_dtypes(dtype):
    with pytest.raises(peer_ref.PEERInputError, match=rf"dtype='{dtype}'.*expected one of \('float64', 'float32'\)"):
        peer_ref.init(LARGE, dtype=dtype)
