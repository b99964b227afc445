"""The "tensorflow" backend: PEER in TensorFlow 2 (XLA-compiled by default) and a Keras 3 layer."""

import tensorflow as tf

from . import layer as _layer_module
from .core import from_numpy, to_numpy, version
from .peer import IMPLEMENTATIONS as implementations
from .peer import apply, clear_caches, init, vjp

name = "tensorflow"
default_path = "compiled"  # what jit=None runs
capabilities = frozenset(
    {"float64", "float32", "bfloat16", "float16", "mixed", "grad", "sparse_grad", "jit"}
    | ({"gpu"} if tf.config.list_physical_devices("GPU") else set())
)
PEER = _layer_module.PEER  # the layer class: from peer_backends.tensorflow import PEER
layer = _layer_module.PEER

__all__ = [
    "PEER",
    "apply",
    "capabilities",
    "default_path",
    "implementations",
    "clear_caches",
    "from_numpy",
    "init",
    "layer",
    "name",
    "to_numpy",
    "version",
    "vjp",
]
