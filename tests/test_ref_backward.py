"""The analytic vjp (SPEC §7) equals central finite differences of sum(y * dy) in float64.

Routing is piecewise constant, so the finite differences hold it fixed at the unperturbed
forward's indices; every parameter element and every element of x is perturbed.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import peer_ref

EPS = 1e-6
# Central differences at EPS=1e-6 on O(1) values are accurate to ~1e-9; 1e-6 leaves headroom
# while a wrong term (missing factor, dropped path) is off by O(1e-2) or more.
TOL = 1e-6


class BackwardCase(NamedTuple):
    cfg: peer_ref.PEERConfig
    params: dict
    state: dict
    x: np.ndarray
    dy: np.ndarray
    training: bool
    mask: np.ndarray | None


@st.composite
def cases(draw):
    n_keys = draw(st.integers(2, 3))
    cfg = peer_ref.PEERConfig(
        d_model=draw(st.integers(1, 3)),
        n_experts=n_keys * n_keys,
        heads=draw(st.integers(1, 2)),
        topk=draw(st.integers(1, 2)),
        d_key=2 * draw(st.integers(1, 2)),
        d_out=draw(st.integers(1, 3)),
        shared_keys=draw(st.booleans()),
        query_norm=draw(st.sampled_from(peer_ref.QUERY_NORMS)),
        query_bias=draw(st.booleans()),
        activation=draw(st.sampled_from(peer_ref.ACTIVATIONS)),
        score=draw(st.sampled_from(peer_ref.SCORES)),
        expert_bias=draw(st.booleans()),
        expert_glu=draw(st.booleans()),
    )
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    params, state = peer_ref.init(cfg, seed=seed)
    # Non-trivial constants, so that the scale/offset/bias paths are exercised away from 1 and 0.
    params = {k: v + 0.3 * rng.standard_normal(v.shape) for k, v in params.items()}
    state = {k: np.abs(v + 0.3 * rng.standard_normal(v.shape)) for k, v in state.items()}
    lead = draw(st.sampled_from([(1,), (2,), (4,), (2, 2), ()]))
    x = rng.standard_normal(lead + (cfg.d_model,))
    dy = rng.standard_normal(lead + (cfg.d_out,))
    mask = rng.random(lead) < 0.7 if draw(st.booleans()) else None
    return BackwardCase(cfg, params, state, x, dy, draw(st.booleans()), mask)


def _loss(case: BackwardCase, params, x, routing) -> float:
    y, _, _ = peer_ref.forward(case.cfg, params, case.state, x, case.training, case.mask, routing)
    return float(np.sum(y * case.dy))


def _central_difference(f, value: np.ndarray) -> np.ndarray:
    grad = np.zeros_like(value)
    for i in np.ndindex(value.shape):
        saved = value[i]
        value[i] = saved + EPS
        up = f()
        value[i] = saved - EPS
        down = f()
        value[i] = saved
        grad[i] = (up - down) / (2 * EPS)
    return grad


def _assert_close(name: str, got: np.ndarray, want: np.ndarray, case: BackwardCase) -> None:
    bound = TOL * max(1.0, float(np.max(np.abs(want), initial=0.0)))
    err = float(np.max(np.abs(got - want), initial=0.0))
    assert err <= bound, (
        f"d{name}: max |analytic - finite difference|={err:.3g}, but should be <= {bound:.3g} "
        f"[{case.cfg}, training={case.training}, mask={'yes' if case.mask is not None else 'no'}, "
        f"x.shape={case.x.shape}]"
    )


def _check(case: BackwardCase) -> None:
    _, _, aux = peer_ref.forward(case.cfg, case.params, case.state, case.x, case.training, case.mask)
    routing = aux["indices"]
    grads, dx = peer_ref.vjp(case.cfg, case.params, case.state, case.x, case.dy, case.training, case.mask)
    assert sorted(grads) == sorted(case.params), f"grads names={sorted(grads)}, but should be {sorted(case.params)}"
    for name, value in case.params.items():
        assert grads[name].shape == value.shape and grads[name].dtype == value.dtype, name
    assert dx.shape == case.x.shape

    params = {k: v.copy() for k, v in case.params.items()}
    x = case.x.copy()
    for name in params:
        numeric = _central_difference(lambda: _loss(case, params, x, routing), params[name])
        _assert_close(name, grads[name], numeric, case)
    _assert_close("x", dx, _central_difference(lambda: _loss(case, params, x, routing), x), case)


@settings(max_examples=150, deadline=None)
@given(cases())
def test_vjp_matches_finite_differences(case):
    _check(case)


def _fixed_case(training: bool, mask: bool, **options) -> BackwardCase:
    cfg = peer_ref.PEERConfig(d_model=3, n_experts=9, heads=2, topk=2, d_key=4, d_out=2, **options)
    rng = np.random.default_rng(7)
    params, state = peer_ref.init(cfg, seed=7)
    params = {k: v + 0.3 * rng.standard_normal(v.shape) for k, v in params.items()}
    x = rng.standard_normal((5, 3))
    dy = rng.standard_normal((5, 2))
    return BackwardCase(
        cfg, params, state, x, dy, training, np.array([True, False, True, True, False]) if mask else None
    )


# Every option value explicitly at least once, so coverage does not depend on the draw.
def test_vjp_every_activation_and_score():
    for activation in peer_ref.ACTIVATIONS:
        for score in peer_ref.SCORES:
            _check(_fixed_case(True, True, activation=activation, score=score))


def test_vjp_glu_experts_every_activation():
    for activation in peer_ref.ACTIVATIONS:
        for training, bias in ((True, True), (False, False)):
            _check(_fixed_case(training, training, activation=activation, expert_glu=True, expert_bias=bias))


def test_vjp_every_structural_option():
    for shared in (True, False):
        for norm in peer_ref.QUERY_NORMS:
            for bias in (True, False):
                for training in (True, False):
                    _check(
                        _fixed_case(
                            training,
                            not bias,
                            shared_keys=shared,
                            query_norm=norm,
                            query_bias=bias,
                            expert_bias=not bias,
                        )
                    )


def test_vjp_is_zero_for_all_masked_and_zero_tokens():
    case = _fixed_case(True, False)
    for x, mask in ((case.x, np.zeros(5, bool)), (case.x[:0], None)):
        dy = np.ones(x.shape[:-1] + (case.cfg.d_out,))
        grads, dx = peer_ref.vjp(case.cfg, case.params, case.state, x, dy, True, mask)
        assert dx.shape == x.shape and not np.any(dx)
        for name, g in grads.items():
            assert not np.any(g), f"grads[{name!r}] should be 0 when no token is valid"
