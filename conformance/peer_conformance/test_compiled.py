"""The compiled path (torch.compile / jax.jit / tf.function with XLA) conforms like the eager one.

Configurations come from a small fixed pool so that compiled functions are reused across
examples instead of recompiled for every one.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peer_ref import PEERConfig

from .helpers import check_forward, check_gradients, needs
from .strategies import cases

POOL = [
    PEERConfig(d_model=8, n_experts=16, heads=2, topk=3, d_key=4),
    PEERConfig(d_model=5, n_experts=25, heads=3, topk=2, d_key=6, d_out=4, shared_keys=False, query_bias=True,
               activation="silu", score="sigmoid", expert_bias=False),
    PEERConfig(d_model=6, n_experts=9, heads=1, topk=3, d_key=2, query_norm="none", activation="relu", score="none"),
]
compiled_cases = st.sampled_from(POOL).flatmap(
    lambda cfg: cases(cfg=cfg, lead=(6,)) | cases(cfg=cfg, lead=(2, 4))
)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
@settings(max_examples=30)
@given(case=compiled_cases)
def test_compiled_forward_matches_reference(backend, dtype, case):
    needs(backend, "jit")
    needs(backend, dtype)
    check_forward(backend, case, dtype, jit=True)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@settings(max_examples=30)
@given(case=compiled_cases)
def test_compiled_gradients_match_reference(backend, dtype, case):
    needs(backend, "jit")
    needs(backend, "grad")
    needs(backend, dtype)
    check_gradients(backend, case, dtype, jit=True)
