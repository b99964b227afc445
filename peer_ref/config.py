"""PEERConfig: every field, default and constraint of a PEER layer (SPEC §1)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .errors import PEERConfigError

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "identity")
SCORES = ("softmax", "sigmoid", "none")
QUERY_NORMS = ("batch", "none")
DTYPES = ("float64", "float32", "bfloat16", "float16")
# Activation dtypes of the mixed mode: float32 parameters, these x and y (SPEC §10.3).
LOW_DTYPES = ("bfloat16", "float16")
# The most sub-keys per side (SPEC §1): n_experts <= MAX_N_KEYS**2 = 2_147_395_600 < 2**31 - 1, so
# every expert index fits a signed 32-bit integer, the index dtype of JAX without x64 and of
# TensorFlow's top-k, and the low half of the torch backend's 64-bit order keys.
MAX_N_KEYS = 46340


def _fail(field: str, value: Any, expected: str) -> PEERConfigError:
    return PEERConfigError(f"PEERConfig.{field}={value!r}, but expected {expected}")


def _check_int(field: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(field, value, f"an int >= {minimum}")
    if value < minimum:
        raise _fail(field, value, f"an int >= {minimum}")


def _check_bool(field: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise _fail(field, value, "a bool")


def _check_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise _fail(field, value, f"one of {choices}")


def _check_float(field: str, value: Any, low: float, high: float, low_open: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(field, value, "a finite float")
    ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise _fail(field, value, f"a float in {bracket}{low}, {high}]")


@dataclasses.dataclass(frozen=True)
class PEERConfig:
    """Hyper-parameters of one PEER layer. Frozen and validated on construction.

    See SPEC §1 for the meaning and the reason behind each default.
    """

    d_model: int
    n_experts: int
    heads: int
    topk: int
    d_key: int
    d_out: int | None = None
    shared_keys: bool = True
    query_norm: str = "batch"
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5
    query_bias: bool = False
    activation: str = "gelu"
    score: str = "softmax"
    expert_bias: bool = True
    expert_glu: bool = False

    def __post_init__(self) -> None:
        _check_int("d_model", self.d_model, 1)
        if self.d_out is None:
            object.__setattr__(self, "d_out", self.d_model)
        _check_int("d_out", self.d_out, 1)
        _check_int("n_experts", self.n_experts, 1)
        root = math.isqrt(self.n_experts)
        if root * root != self.n_experts:
            raise _fail("n_experts", self.n_experts, "a perfect square (n_keys**2)")
        if root > MAX_N_KEYS:
            raise _fail("n_experts", self.n_experts,
                        f"<= {MAX_N_KEYS}**2 = {MAX_N_KEYS**2} (expert indices must fit int32)")
        _check_int("heads", self.heads, 1)
        _check_int("topk", self.topk, 1)
        if self.topk > root:
            raise _fail("topk", self.topk, f"<= n_keys = isqrt(n_experts) = {root}")
        _check_int("d_key", self.d_key, 2)
        if self.d_key % 2:
            raise _fail("d_key", self.d_key, "an even int (two halves per query)")
        _check_bool("shared_keys", self.shared_keys)
        _check_choice("query_norm", self.query_norm, QUERY_NORMS)
        _check_float("bn_momentum", self.bn_momentum, 0.0, 1.0, low_open=False)
        _check_float("bn_eps", self.bn_eps, 0.0, math.inf, low_open=True)
        _check_bool("query_bias", self.query_bias)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("score", self.score, SCORES)
        _check_bool("expert_bias", self.expert_bias)
        _check_bool("expert_glu", self.expert_glu)

    # Derived sizes (SPEC §1.2).
    @property
    def n_keys(self) -> int:
        return math.isqrt(self.n_experts)

    @property
    def key_sets(self) -> int:
        return 1 if self.shared_keys else self.heads

    @property
    def d_query(self) -> int:
        return self.heads * self.d_key

    @property
    def d_half(self) -> int:
        return self.d_key // 2

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical trainable parameters and their shapes (SPEC §2)."""
        shapes: dict[str, tuple[int, ...]] = {"query.kernel": (self.d_model, self.d_query)}
        if self.query_bias:
            shapes["query.bias"] = (self.d_query,)
        if self.query_norm == "batch":
            shapes["query_norm.scale"] = (self.d_query,)
            shapes["query_norm.offset"] = (self.d_query,)
        shapes["keys.left"] = (self.key_sets, self.n_keys, self.d_half)
        shapes["keys.right"] = (self.key_sets, self.n_keys, self.d_half)
        shapes["experts.down"] = (self.n_experts, self.d_model)
        if self.expert_glu:
            shapes["experts.gate"] = (self.n_experts, self.d_model)
        shapes["experts.up"] = (self.n_experts, self.d_out)
        if self.expert_bias:
            shapes["experts.bias"] = (self.n_experts,)
        return shapes

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical non-trainable state and its shapes (SPEC §2)."""
        if self.query_norm != "batch":
            return {}
        return {"query_norm.mean": (self.d_query,), "query_norm.var": (self.d_query,)}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PEERConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PEERConfigError(
                f"PEERConfig got unknown field(s) {unknown}, but expected only {sorted(known)}"
            )
        return cls(**data)
