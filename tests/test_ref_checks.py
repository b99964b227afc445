"""Argument validation of forward and vjp (SPEC §9): each bad argument is named, with its value and the rule.

Every case runs through both peer_ref.forward and peer_ref.vjp, which must reject it identically.
"""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np
import pytest

import peer_ref

CFG = peer_ref.PEERConfig(d_model=4, n_experts=9, heads=2, topk=2, d_key=4, d_out=3, query_bias=True)
PARAMS, STATE = peer_ref.init(CFG, seed=0)
X = np.random.default_rng(0).standard_normal((2, 5, 4))
DY = np.ones((2, 5, 3))


def _call_both(message: str, params=PARAMS, state=STATE, x=X, dy=DY, training=False, mask=None, routing=None, cfg=CFG):
    pattern = re.escape(message)
    with pytest.raises(peer_ref.PEERInputError, match=pattern):
        peer_ref.forward(cfg, params, state, x, training, mask, routing)
    with pytest.raises(peer_ref.PEERInputError, match=pattern):
        peer_ref.vjp(cfg, params, state, x, dy, training, mask, routing)


def test_x_last_dimension():
    _call_both("x.shape=(2, 5, 3), but expected a last dimension of d_model=4", x=X[..., :3])


def test_x_scalar():
    _call_both("x.shape=(), but expected (..., d_model=4)", x=np.array(1.0))


def test_x_not_an_array():
    _call_both("x is list, but expected a numpy.ndarray", x=X.tolist())


def test_x_dtype_must_equal_params_dtype():
    _call_both("x.dtype=float32, but expected float64", x=X.astype(np.float32), dy=DY.astype(np.float32))
    params32 = {k: v.astype(np.float32) for k, v in PARAMS.items()}
    state32 = {k: v.astype(np.float32) for k, v in STATE.items()}
    _call_both("x.dtype=float64, but expected float32", params=params32, state=state32)


def test_reference_rejects_bfloat16_params():
    params = {k: v.astype(ml_dtypes.bfloat16) for k, v in PARAMS.items()}
    state = {k: v.astype(np.float32) for k, v in STATE.items()}
    x = X.astype(ml_dtypes.bfloat16)
    _call_both(
        "dtype='bfloat16', but expected one of ('float64', 'float32')",
        params=params,
        state=state,
        x=x,
        dy=DY.astype(ml_dtypes.bfloat16),
    )


def test_mask_dtype_and_shape():
    _call_both("mask.dtype=int64, but expected bool", mask=np.ones((2, 5), np.int64))
    _call_both("mask.dtype=float64, but expected bool", mask=np.ones((2, 5)))
    _call_both("mask.shape=(10,), but expected x.shape[:-1]=(2, 5)", mask=np.ones(10, bool))
    _call_both("mask.shape=(2, 5, 1), but expected x.shape[:-1]=(2, 5)", mask=np.ones((2, 5, 1), bool))


def test_routing_dtype_shape_and_range():
    good = np.zeros((2, 5, 2, 2), np.int64)
    _call_both("routing.dtype=float64, but expected an integer dtype", routing=good.astype(np.float64))
    _call_both("routing.dtype=bool, but expected an integer dtype", routing=good.astype(bool))
    _call_both(
        "routing.shape=(2, 5, 2, 1), but expected x.shape[:-1] + (heads, topk)=(2, 5, 2, 2)", routing=good[..., :1]
    )
    _call_both("routing.shape=(10, 2, 2), but expected", routing=good.reshape(10, 2, 2))
    for bad in (-1, 9, 100):
        routing = good.copy()
        routing[1, 3, 0, 1] = bad
        _call_both(f"routing contains {bad}, but expected expert indices in [0, n_experts=9)", routing=routing)
    edge = good.copy()
    edge[0, 0] = 8
    peer_ref.forward(CFG, PARAMS, STATE, X, routing=edge.astype(np.uint8))


def test_empty_routing_is_accepted():
    y, _, aux = peer_ref.forward(CFG, PARAMS, STATE, X[:, :0], routing=np.zeros((2, 0, 2, 2), np.int32))
    assert y.shape == (2, 0, 3) and aux["indices"].shape == (2, 0, 2, 2)


def test_dy_shape_and_dtype():
    with pytest.raises(
        peer_ref.PEERInputError, match=re.escape("dy.shape=(2, 5, 4), but expected x.shape[:-1] + (d_out,)=(2, 5, 3)")
    ):
        peer_ref.vjp(CFG, PARAMS, STATE, X, np.ones((2, 5, 4)))
    with pytest.raises(peer_ref.PEERInputError, match=re.escape("dy.shape=(10, 3), but expected")):
        peer_ref.vjp(CFG, PARAMS, STATE, X, np.ones((10, 3)))
    with pytest.raises(peer_ref.PEERInputError, match=re.escape("dy.dtype=float32, but expected float64")):
        peer_ref.vjp(CFG, PARAMS, STATE, X, DY.astype(np.float32))


@pytest.mark.parametrize("training", [1, 0, None, "yes", np.float64(1.0)])
def test_training_must_be_a_bool(training):
    _call_both(f"training={training!r}, but expected a bool", training=training)


def test_params_names():
    missing = {k: v for k, v in PARAMS.items() if k != "query.bias"}
    _call_both("params has names missing=['query.bias'] extra=[]", params=missing)
    extra = {**PARAMS, "experts.gate": np.zeros(9)}
    _call_both("params has names missing=[] extra=['experts.gate']", params=extra)
    renamed = {("query.w" if k == "query.kernel" else k): v for k, v in PARAMS.items()}
    _call_both("params has names missing=['query.kernel'] extra=['query.w']", params=renamed)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_params_shapes(name):
    bad = {**PARAMS, name: np.zeros(PARAMS[name].shape + (1,))}
    _call_both(f"params[{name!r}].shape={bad[name].shape}, but expected {PARAMS[name].shape}", params=bad)


GLU_CFG = peer_ref.PEERConfig(d_model=4, n_experts=9, heads=2, topk=2, d_key=4, d_out=3, expert_glu=True)
GLU_PARAMS, GLU_STATE = peer_ref.init(GLU_CFG, seed=0)


def test_glu_gate_missing_wrong_shape_or_dtype():
    call = dict(state=GLU_STATE, cfg=GLU_CFG)
    missing = {k: v for k, v in GLU_PARAMS.items() if k != "experts.gate"}
    _call_both("params has names missing=['experts.gate'] extra=[]", params=missing, **call)
    transposed = {**GLU_PARAMS, "experts.gate": GLU_PARAMS["experts.gate"].T.copy()}
    _call_both("params['experts.gate'].shape=(4, 9), but expected (9, 4)", params=transposed, **call)
    single = {**GLU_PARAMS, "experts.gate": GLU_PARAMS["experts.gate"].astype(np.float32)}
    _call_both(
        "params['experts.gate'].dtype=float32, but expected float64 like the rest of params", params=single, **call
    )


def test_params_mixed_dtypes():
    mixed = {**PARAMS, "experts.up": PARAMS["experts.up"].astype(np.float32)}
    _call_both("params['experts.up'].dtype=float32, but expected float64 like the rest of params", params=mixed)
    ints = {k: v.astype(np.int64) for k, v in PARAMS.items()}
    _call_both("params['query.kernel'].dtype=int64, but expected one of", params=ints, x=X.astype(np.int64))


def test_params_and_state_must_be_dicts():
    _call_both("params is list, but expected a dict of arrays", params=list(PARAMS.values()))
    _call_both("state is NoneType, but expected a dict of arrays", state=None)


def test_state_names_shapes_and_dtype():
    _call_both(
        "state has names missing=['query_norm.var'] extra=[]", state={"query_norm.mean": STATE["query_norm.mean"]}
    )
    _call_both("state['query_norm.var'].shape=(4,), but expected (8,)", state={**STATE, "query_norm.var": np.ones(4)})
    _call_both(
        "state['query_norm.mean'].dtype=float32, but expected float64",
        state={k: v.astype(np.float32) for k, v in STATE.items()},
    )
    no_norm = peer_ref.PEERConfig.from_dict({**CFG.to_dict(), "query_norm": "none"})
    params = {k: v for k, v in PARAMS.items() if not k.startswith("query_norm.")}
    _call_both(
        "state has names ['query_norm.mean', 'query_norm.var'], but expected none when query_norm='none'",
        cfg=no_norm,
        params=params,
    )
    peer_ref.forward(no_norm, params, {}, X)


def test_inputs_are_not_modified():
    params = {k: v.copy() for k, v in PARAMS.items()}
    state = {k: v.copy() for k, v in STATE.items()}
    x, dy = X.copy(), DY.copy()
    mask = np.ones((2, 5), bool)
    mask[0, 1] = False
    peer_ref.forward(CFG, params, state, x, True, mask)
    peer_ref.vjp(CFG, params, state, x, dy, True, mask)
    for before, after in ((PARAMS, params), (STATE, state), ({"x": X, "dy": DY}, {"x": x, "dy": dy})):
        for name in before:
            np.testing.assert_array_equal(after[name], before[name], err_msg=name)
