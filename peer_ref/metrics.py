"""Expert usage and unevenness, the metrics of the paper's Table 2 (SPEC §11).

Accumulate z'_i = sum over tokens and heads of |g_i(x)| (0 where expert i is not
selected), normalise z = z' / ||z'||_1, then
usage = fraction of experts with z_i != 0, unevenness = KL(z || uniform) = log N + sum z log z.
"""

from __future__ import annotations

import math

import numpy as np

from .config import PEERConfig
from .errors import PEERInputError


def accumulate(
    cfg: PEERConfig,
    indices: np.ndarray,
    weights: np.ndarray,
    mask: np.ndarray | None = None,
    into: np.ndarray | None = None,
) -> np.ndarray:
    """Add one batch's router weights to the per-expert totals z' (float64, shape (n_experts,)).

    ``indices`` and ``weights`` are ``aux["indices"]`` and ``aux["weights"]``; masked tokens
    are left out. Magnitudes are used so that score="none" (signed weights) is defined too.
    """
    indices = np.asarray(indices)
    weights = np.asarray(weights, dtype=np.float64)
    if indices.shape != weights.shape or indices.shape[-2:] != (cfg.heads, cfg.topk):
        raise PEERInputError(
            f"indices.shape={indices.shape} and weights.shape={weights.shape}, "
            f"but expected equal shapes (..., heads={cfg.heads}, topk={cfg.topk})"
        )
    totals = np.zeros(cfg.n_experts) if into is None else into
    if totals.shape != (cfg.n_experts,):
        raise PEERInputError(f"into.shape={totals.shape}, but expected ({cfg.n_experts},)")
    w = np.abs(weights)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != indices.shape[:-2]:
            raise PEERInputError(f"mask.shape={mask.shape}, but expected {indices.shape[:-2]}")
        w = np.where(mask[..., None, None], w, 0.0)  # a select, so NaN weights of padding drop out
    np.add.at(totals, indices.reshape(-1), w.reshape(-1))
    return totals


def _normalised(totals: np.ndarray) -> np.ndarray:
    total = float(np.sum(totals))
    if not total > 0:
        raise PEERInputError("totals sum to 0, but expected at least one routed token")
    return np.asarray(totals, dtype=np.float64) / total


def usage(totals: np.ndarray) -> float:
    """Fraction of experts that received any router weight."""
    return float(np.count_nonzero(_normalised(totals)) / np.size(totals))


def unevenness(totals: np.ndarray) -> float:
    """KL divergence of the normalised usage from uniform, in nats (0 = perfectly even)."""
    z = _normalised(totals)
    nz = z[z > 0]
    return float(math.log(z.size) + np.sum(nz * np.log(nz)))
