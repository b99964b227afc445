"""The "jax" backend: jax.jit-compiled functions and a flax.nnx module.

float64 needs JAX's x64 mode, which this backend never switches on by itself (import-time
work is zero, and the flag is process-wide); with x64 off, float64 is refused with the fix.
"""

import jax

from . import layer as _layer_module
from .core import from_numpy, to_numpy, version
from .peer import IMPLEMENTATIONS as implementations
from .peer import apply, clear_caches, init, vjp
from .sparse import RowSparse, apply_row_updates, row_update

name = "jax"
default_path = "compiled"  # what jit=None runs
capabilities = frozenset(
    {"float64", "float32", "bfloat16", "float16", "mixed", "grad", "sparse_grad", "jit"}
    | ({"gpu"} if jax.default_backend() == "gpu" else set())
)
PEER = _layer_module.PEER  # the layer class: from peer_backends.jax import PEER
layer = _layer_module.layer
# Row-sparse table gradients for the layer inside a model (SPEC §7.1), and their optimizer.
ExpertTable = _layer_module.ExpertTable
DENSE_PARAMS = _layer_module.DENSE_PARAMS
sparse_value_and_grad = _layer_module.sparse_value_and_grad
RowOptimizer = _layer_module.RowOptimizer


def enable_float64() -> None:
    """Switch on JAX's x64 mode (process-wide), which float64 arrays need; the conformance
    plugin calls this, and a user who wants float64 calls it (or sets JAX_ENABLE_X64=1)."""
    jax.config.update("jax_enable_x64", True)


__all__ = [
    "DENSE_PARAMS",
    "ExpertTable",
    "PEER",
    "RowOptimizer",
    "RowSparse",
    "apply_row_updates",
    "apply",
    "capabilities",
    "default_path",
    "implementations",
    "clear_caches",
    "enable_float64",
    "from_numpy",
    "init",
    "layer",
    "name",
    "row_update",
    "sparse_value_and_grad",
    "to_numpy",
    "version",
    "vjp",
]
