"""One bad input, one message: the reference and every backend raise the same PEERInputError
(peer_ref.checks.check_arguments decides; the reference's own float64/float32 limit comes after)."""

import contextlib

import numpy as np
import pytest

import peer_backends
import peer_ref
from peer_ref import PEERInputError
from peer_ref.forward_pass import low_numpy_dtype

CFG = peer_ref.PEERConfig(d_model=2, n_experts=1, heads=1, topk=1, d_key=2)
BACKENDS = ["numpy", "torch", "jax", "tensorflow"]  # torch before tensorflow (import order)


def _message(call):
    with pytest.raises(PEERInputError) as info:
        call()
    return str(info.value)


def _x64(name, dtype):
    if name == "jax" and dtype == "float64":
        import jax

        return jax.enable_x64(True) if hasattr(jax, "enable_x64") else jax.experimental.enable_x64()
    return contextlib.nullcontext()


@pytest.mark.parametrize(
    ("param_dtype", "x_dtype"),
    [
        ("float16", "float32"),
        ("bfloat16", "float32"),
        ("float64", "float32"),
        ("float32", "float16"),
        ("float16", "bfloat16"),
    ],
)
def test_parameters_and_x_of_different_dtypes_get_one_message(param_dtype, x_dtype):
    params, state = peer_ref.init(CFG, seed=0, dtype="float64" if param_dtype == "float64" else "float32")
    params = {k: v.astype(low_numpy_dtype(param_dtype)) for k, v in params.items()}
    x = np.ones((3, CFG.d_model)).astype(low_numpy_dtype(x_dtype))
    expected = _message(lambda: peer_ref.forward(CFG, params, state, x))
    assert expected.startswith(f"x.dtype={x_dtype}, but expected {param_dtype} (the parameters' dtype"), expected
    assert _message(lambda: peer_ref.vjp(CFG, params, state, x, x)) == expected
    for name in BACKENDS:
        try:
            be = peer_backends.get(name)
        except Exception as error:  # a framework that is not installed
            pytest.skip(f"{name}: {error}")
        with _x64(name, param_dtype):
            p, s, xb = be.from_numpy(params), be.from_numpy(state), be.from_numpy(x)
            assert _message(lambda be=be, p=p, s=s, xb=xb: be.apply(CFG, p, s, xb)) == expected, name
            assert _message(lambda be=be, p=p, s=s, xb=xb: be.vjp(CFG, p, s, xb, xb)) == expected, name
