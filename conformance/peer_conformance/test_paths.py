"""Both execution paths conform: the eager one (jit=False) and the compiled one (jit=True:
torch.compile / jax.jit / tf.function with XLA). The other modules run the backend's default path
(``jit=None``); a backend that names it (``default_path``, see the contract) has that leg skipped here.
"""

import pytest
from hypothesis import given

from .helpers import MIXED, check_forward, check_gradients, needs, needs_mode
from .strategies import PATHS as PATH_SETTINGS
from .strategies import cases

SECTION = "§13 Eager and compiled paths"

PATHS = {"eager": False, "compiled": True}


def _needs_path(backend, path):
    if path == "compiled":
        needs(backend, "jit")
    if path == getattr(backend, "default_path", None):
        pytest.skip(f"{path} is backend {backend.name!r}'s default path, which every other module checks")


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
@PATH_SETTINGS
@given(case=cases())
def test_path_forward_matches_reference(backend, path, dtype, case):
    _needs_path(backend, path)
    needs(backend, dtype)
    check_forward(backend, case, dtype, jit=PATHS[path])


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@PATH_SETTINGS
@given(case=cases())
def test_path_gradients_match_reference(backend, path, dtype, case):
    _needs_path(backend, path)
    needs(backend, "grad")
    needs(backend, dtype)
    check_gradients(backend, case, dtype, jit=PATHS[path])


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize(("dtype", "compute_dtype"), MIXED)
@PATH_SETTINGS
@given(case=cases())
def test_path_mixed_matches_reference(backend, path, dtype, compute_dtype, case):
    """SPEC §10.3 on both paths: a compiler must not fold the prescribed roundings away."""
    _needs_path(backend, path)
    needs_mode(backend, dtype, compute_dtype)
    check_forward(backend, case, dtype, jit=PATHS[path], compute_dtype=compute_dtype)
    if "grad" in backend.capabilities:
        check_gradients(backend, case, dtype, jit=PATHS[path], compute_dtype=compute_dtype)
