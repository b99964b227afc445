"""The "numpy" backend: the reference implementation behind the backend contract."""

from . import layer as _layer_module
from .core import from_numpy, to_numpy, version
from .peer import IMPLEMENTATIONS as implementations
from .peer import apply, init, vjp

name = "numpy"
default_path = "eager"  # what jit=None runs
capabilities = frozenset({"float64", "float32", "grad", "mixed", "sparse_grad"})
PEER = _layer_module.PEER  # the layer class: from peer_backends.numpy import PEER
layer = _layer_module.PEER

__all__ = [
    "PEER",
    "apply",
    "capabilities",
    "default_path",
    "implementations",
    "from_numpy",
    "init",
    "layer",
    "name",
    "to_numpy",
    "version",
    "vjp",
]
