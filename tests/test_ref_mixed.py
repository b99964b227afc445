"""SPEC §10.3 mixed precision in the reference: which reads are rounded, gradients, overflow, errors."""

import ml_dtypes
import numpy as np
import pytest

import peer_ref
from peer_ref import PEERConfig, PEERInputError
from peer_ref.checks import check_compute_dtype

LOW = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
CFG = PEERConfig(d_model=6, n_experts=25, heads=2, topk=3, d_key=4, query_bias=True, expert_glu=True)
# Read in the low dtype (SPEC §10.3), written out here rather than imported from the reference.
READ_LOW = {"query.kernel", "experts.down", "experts.gate", "experts.up"}


def _case(seed=0):
    params, state = peer_ref.init(CFG, seed=seed, dtype="float32")
    rng = np.random.default_rng(seed)
    # Values that do not fit the low dtypes exactly, in every parameter.
    params = {
        k: (v + rng.standard_normal(v.shape).astype(np.float32) * 0.3).astype(np.float32) for k, v in params.items()
    }
    x = rng.standard_normal((7, CFG.d_model)).astype(np.float32)
    dy = rng.standard_normal((7, CFG.d_out)).astype(np.float32)
    return params, state, x, dy


def _rounded(params, low):
    return {k: v.astype(LOW[low]).astype(np.float32) if k in READ_LOW else v for k, v in params.items()}


@pytest.mark.parametrize("low", sorted(LOW))
@pytest.mark.parametrize("training", [False, True])
def test_mixed_forward_is_float32_on_the_rounded_reads_then_rounded_once(low, training):
    params, state, x, _ = _case()
    xl = x.astype(LOW[low])
    y, new_state, aux = peer_ref.forward(CFG, params, state, xl, training, compute_dtype=low)
    y32, state32, aux32 = peer_ref.forward(CFG, _rounded(params, low), state, xl.astype(np.float32), training)
    assert y.dtype == LOW[low]
    np.testing.assert_array_equal(y, y32.astype(LOW[low]))
    np.testing.assert_array_equal(aux["indices"], aux32["indices"])
    for key in ("scores", "weights"):
        assert aux[key].dtype == np.float32
        np.testing.assert_array_equal(aux[key], aux32[key])
    for name in new_state:
        assert new_state[name].dtype == np.float32
        np.testing.assert_array_equal(new_state[name], state32[name])


@pytest.mark.parametrize("low", sorted(LOW))
def test_sub_keys_and_biases_are_read_in_float32(low):
    params, state, x, _ = _case(1)
    xl = x.astype(LOW[low])
    _, _, aux = peer_ref.forward(CFG, params, state, xl, compute_dtype=low)
    # Rounding the sub-keys as well would change the float32 scores.
    everything = {k: v.astype(LOW[low]).astype(np.float32) for k, v in params.items()}
    _, _, aux_all = peer_ref.forward(CFG, everything, state, xl.astype(np.float32))
    assert not np.array_equal(aux["scores"], aux_all["scores"])


@pytest.mark.parametrize("low", sorted(LOW))
@pytest.mark.parametrize("training", [False, True])
def test_mixed_gradients_are_straight_through(low, training):
    params, state, x, dy = _case(2)
    xl, dyl = x.astype(LOW[low]), dy.astype(LOW[low])
    mask = np.arange(7) != 3
    grads, dx = peer_ref.vjp(CFG, params, state, xl, dyl, training, mask, compute_dtype=low)
    grads32, dx32 = peer_ref.vjp(
        CFG, _rounded(params, low), state, xl.astype(np.float32), dyl.astype(np.float32), training, mask
    )
    assert dx.dtype == LOW[low]
    np.testing.assert_array_equal(dx, dx32.astype(LOW[low]))
    for name, value in grads.items():
        assert value.dtype == np.float32, name
        np.testing.assert_array_equal(value, grads32[name], err_msg=name)


def test_float16_output_overflows_to_inf_but_scores_stay_finite():
    cfg = PEERConfig(
        d_model=2,
        n_experts=4,
        heads=1,
        topk=1,
        d_key=2,
        query_norm="none",
        score="none",
        activation="identity",
        expert_bias=False,
    )
    params = {
        "query.kernel": np.full((2, 2), 300.0, np.float32),
        "keys.left": np.full((1, 2, 1), 1.0, np.float32),
        "keys.right": np.full((1, 2, 1), 1.0, np.float32),
        "experts.down": np.full((4, 2), 1.0, np.float32),
        "experts.up": np.full((4, 2), 1.0, np.float32),
    }
    x = np.full((1, 2), 200.0, np.float16)
    y, _, aux = peer_ref.forward(cfg, params, {}, x, compute_dtype="float16")
    # q = 2 * 200 * 300 = 120000 per half: a float32 score of 240000, beyond float16's 65504.
    assert aux["scores"].dtype == np.float32 and aux["scores"].item() == 240000.0
    # y = score * (x . down) * up = 240000 * 400: +inf in float16, as any float16 result beyond its range.
    assert y.dtype == np.float16 and np.all(np.isposinf(y))


def test_check_compute_dtype_accepts_exactly_the_decided_pairs():
    for params in peer_ref.DTYPES:
        assert check_compute_dtype(params, None) is None
        assert check_compute_dtype(params, params) is None
    assert check_compute_dtype("float32", "bfloat16") == "bfloat16"
    assert check_compute_dtype("float32", "float16") == "float16"
    for params, compute in [
        ("float64", "float16"),
        ("float64", "bfloat16"),
        ("float32", "float64"),
        ("bfloat16", "float32"),
        ("float16", "bfloat16"),
        ("bfloat16", "float16"),
    ]:
        with pytest.raises(PEERInputError, match=rf"compute_dtype='{compute}' with {params} parameters"):
            check_compute_dtype(params, compute)
    for bad in ("int8", "half", 16, np.float16):
        with pytest.raises(PEERInputError, match=r"compute_dtype=.*but expected None or one of"):
            check_compute_dtype("float32", bad)


def test_mixed_mode_refuses_activations_of_another_dtype():
    params, state, x, dy = _case()
    with pytest.raises(PEERInputError, match=r"x\.dtype=float32, but expected bfloat16 \(compute_dtype='bfloat16'"):
        peer_ref.forward(CFG, params, state, x, compute_dtype="bfloat16")
    with pytest.raises(PEERInputError, match=r"dy\.dtype=float32, but expected float16"):
        peer_ref.vjp(CFG, params, state, x.astype(np.float16), dy, compute_dtype="float16")
    with pytest.raises(PEERInputError, match=r"x\.dtype=bfloat16, but expected float32 .*pass compute_dtype="):
        peer_ref.forward(CFG, params, state, x.astype(LOW["bfloat16"]))
