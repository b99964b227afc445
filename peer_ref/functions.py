"""Expert activations and router score functions with their derivatives (SPEC §3.9, §3.10)."""

from __future__ import annotations

import math

import numpy as np

_erf = np.frompyfunc(math.erf, 1, 1)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_TANH_C = 0.044715


def erf(z: np.ndarray) -> np.ndarray:
    """Exact erf, elementwise (NumPy has none); computed in float64, cast back."""
    return _erf(z.astype(np.float64)).astype(np.float64).astype(z.dtype, copy=False)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # Two branches so that neither exp() overflows.
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


def activation(name: str, z: np.ndarray) -> np.ndarray:
    if name == "gelu":
        return 0.5 * z * (1.0 + erf(z / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * z * (1.0 + np.tanh(_SQRT_2_OVER_PI * (z + _GELU_TANH_C * z**3)))
    if name == "relu":
        return np.maximum(z, 0)
    if name == "silu":
        return z * _sigmoid(z)
    if name == "identity":
        return z.copy()
    raise ValueError(f"activation={name!r} is unknown")


def activation_grad(name: str, z: np.ndarray) -> np.ndarray:
    """d activation / dz. relu'(0) = 0 (SPEC §7)."""
    if name == "gelu":
        cdf = 0.5 * (1.0 + erf(z / math.sqrt(2.0)))
        pdf = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
        return cdf + z * pdf
    if name == "gelu_tanh":
        inner = _SQRT_2_OVER_PI * (z + _GELU_TANH_C * z**3)
        t = np.tanh(inner)
        dinner = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_C * z * z)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * dinner
    if name == "relu":
        return (z > 0).astype(z.dtype)
    if name == "silu":
        s = _sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    if name == "identity":
        return np.ones_like(z)
    raise ValueError(f"activation={name!r} is unknown")


def score_weights(name: str, scores: np.ndarray) -> np.ndarray:
    """Router weights from the k raw scores of each head (last axis)."""
    if name == "softmax":
        shifted = scores - scores.max(axis=-1, keepdims=True)
        e = np.exp(shifted)
        return e / e.sum(axis=-1, keepdims=True)
    if name == "sigmoid":
        return _sigmoid(scores)
    if name == "none":
        return scores.copy()
    raise ValueError(f"score={name!r} is unknown")


def score_weights_vjp(name: str, weights: np.ndarray, dweights: np.ndarray) -> np.ndarray:
    """Cotangent of the raw scores given the weights and their cotangent."""
    if name == "softmax":
        return weights * (dweights - (weights * dweights).sum(axis=-1, keepdims=True))
    if name == "sigmoid":
        return weights * (1.0 - weights) * dweights
    if name == "none":
        return dweights.copy()
    raise ValueError(f"score={name!r} is unknown")
