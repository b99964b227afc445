"""peer_ref — the NumPy reference implementation of the PEER layer.

It is the executable form of spec/SPEC.md: float64 (and float32) forward, analytic
backward, and the oracles the conformance suite checks every backend against.
"""

from . import checks, metrics
from .backward_pass import EXPERT_TABLES, RowSparse, gradient_rows, vjp
from .config import ACTIVATIONS, DTYPES, MAX_N_KEYS, QUERY_NORMS, SCORES, PEERConfig
from .errors import PEERCheckpointError, PEERConfigError, PEERInputError
from .forward_pass import forward, routing_scores
from .init import init, init_constant, init_std
from .routing import brute_force_topk, product_key_topk, sub_key_scores
from .tolerances import TOLERANCES, Tolerance

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "DTYPES",
    "EXPERT_TABLES",
    "MAX_N_KEYS",
    "QUERY_NORMS",
    "SCORES",
    "PEERConfig",
    "PEERCheckpointError",
    "PEERConfigError",
    "PEERInputError",
    "RowSparse",
    "TOLERANCES",
    "Tolerance",
    "brute_force_topk",
    "checks",
    "forward",
    "gradient_rows",
    "init",
    "init_constant",
    "init_std",
    "metrics",
    "product_key_topk",
    "routing_scores",
    "sub_key_scores",
    "vjp",
]
