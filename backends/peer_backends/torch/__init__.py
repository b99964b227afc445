"""The "torch" backend: PyTorch functional API (init/apply/vjp) and an nn.Module layer."""

import torch as _torch

from . import layer as _layer_module
from .core import from_numpy, to_numpy, version
from .peer import IMPLEMENTATIONS as implementations
from .peer import apply, clear_caches, init, vjp

name = "torch"
default_path = "eager"  # what jit=None runs
capabilities = frozenset(
    {"float64", "float32", "bfloat16", "float16", "mixed", "grad", "sparse_grad", "jit"}
    | ({"gpu"} if _torch.cuda.is_available() else set())
)
PEER = _layer_module.PEER  # the layer class: from peer_backends.torch import PEER
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
