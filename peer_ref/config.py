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
    """Hyper-parameters of one PEER layer (SPEC §1). Frozen and validated on construction.

    A layer maps ``x`` of shape ``(..., d_model)`` to ``y`` of shape ``(..., d_out)``: each token's
    query, split into ``heads`` heads of ``d_key`` features, retrieves through product keys the
    ``topk`` best of ``n_experts`` single-neuron experts per head, and sums their outputs weighted by
    the router scores. ``PEERConfig.paper(d_model=...)`` gives the paper's layer.

    Attributes:
        d_model: Width of the input ``x`` (the paper's ``n``); int >= 1. Required.
        n_experts: Size ``N`` of the expert pool; a perfect square ``n_keys**2`` (product keys,
            SPEC §3.5–§3.8), at most ``MAX_N_KEYS**2`` = 46340² so that every expert index fits
            int32. Required. The paper's layer has 1024² (``paper``).
        heads: Retrieval heads ``h`` sharing one expert pool (paper §2); int >= 1. Required. The
            query has ``heads * d_key`` features (``d_query``).
        topk: Experts ``k`` retrieved per head; 1 <= ``topk`` <= ``n_keys``. Required. A token
            activates ``heads * topk`` experts.
        d_key: Query features per head, split into two halves of ``d_half = d_key // 2``, one per
            sub-key table; an even int >= 2. Required. The paper does not report it.
        d_out: Width of the output ``y`` (the paper's ``m``); int >= 1, or ``None`` (default) for
            ``d_model``.
        shared_keys: ``True`` (default, the paper's choice): one set of product keys for every
            head; ``False``: one per head, as in PKM. ``keys.left``/``keys.right`` have
            ``key_sets = 1 if shared_keys else heads`` sets (SPEC §2).
        query_norm: ``"batch"`` (default): batch norm on the queries, as in the paper's
            experiments (SPEC §3.3: biased batch variance, running statistics with PyTorch's
            momentum convention); ``"none"``: no normalisation and no state.
        bn_momentum: Weight of the new batch in the running statistics' update (SPEC §3.3);
            float in [0, 1], default 0.1 (PyTorch's and PKM's).
        bn_eps: Added to the variance inside the square root (SPEC §3.3); float > 0, default 1e-5.
        query_bias: Whether the query projection has a bias ``query.bias`` of shape
            ``(heads * d_key,)``; default ``False`` (under batch norm a bias has zero gradient and
            the norm's offset plays its role).
        activation: The experts' nonlinearity (SPEC §3.10): ``"gelu"`` (default, exact, erf),
            ``"gelu_tanh"``, ``"relu"``, ``"silu"`` or ``"identity"``.
        score: The router's score function over each head's ``topk`` scores (SPEC §3.9):
            ``"softmax"`` (default, the paper's Algorithm 1), ``"sigmoid"`` or ``"none"``.
        expert_bias: Whether each expert has a scalar hidden bias, ``experts.bias`` of shape
            ``(n_experts,)``; default ``True`` (the paper's ``2·d_model + 1`` parameters per expert).
        expert_glu: GLU experts (SPEC §3.10): each expert gains a gate row, ``experts.gate`` of
            shape ``(n_experts, d_model)``, and computes ``act(u·x + b) · (g·x) · v``; default
            ``False``, as in the paper's experiments.

    Raises:
        PEERConfigError: A field is out of its domain; the message names the field, the value
            received and the constraint (SPEC §1), e.g. ``PEERConfig.topk=9, but expected <=
            n_keys = isqrt(n_experts) = 8``.
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
            raise _fail(
                "n_experts", self.n_experts, f"<= {MAX_N_KEYS}**2 = {MAX_N_KEYS**2} (expert indices must fit int32)"
            )
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

    @classmethod
    def paper(cls, d_model: int, **overrides: Any) -> PEERConfig:
        """The layer of the paper's experiments (He 2024, §3) for a model of width ``d_model``.

        What the paper fixes: ``n_experts = 1024**2``, ``heads = 8``, ``topk = 16`` (128 active
        experts per token), query batch norm, one set of product keys shared by every head and
        softmax router scores. What it leaves open keeps this project's defaults (SPEC §1): exact
        GELU experts with a hidden bias, no query bias. The paper does not report the query size
        per head; ``d_key = 128`` here (the benchmark's ``paper`` preset uses the same).

        Args:
            d_model: Width of the input (and, unless ``d_out`` is given, of the output).
            **overrides: Any other ``PEERConfig`` field, e.g. ``d_key=256`` or, for a small test,
                ``n_experts=64**2``.

        Returns:
            A validated ``PEERConfig``.

        Raises:
            PEERConfigError: An override names no field, or a value is out of its domain.
        """
        fields = {
            "d_model": d_model,
            "n_experts": 1024**2,
            "heads": 8,
            "topk": 16,
            "d_key": 128,
            "shared_keys": True,
            "query_norm": "batch",
            "score": "softmax",
        }
        return cls.from_dict({**fields, **overrides})

    # Derived sizes (SPEC §1).
    @property
    def n_keys(self) -> int:
        """Sub-keys per table, ``isqrt(n_experts)``: expert ``i = left * n_keys + right`` (SPEC §2)."""
        return math.isqrt(self.n_experts)

    @property
    def key_sets(self) -> int:
        """Sets of product keys: 1 with ``shared_keys``, else ``heads``."""
        return 1 if self.shared_keys else self.heads

    @property
    def d_query(self) -> int:
        """Features of a token's query over all heads, ``heads * d_key``."""
        return self.heads * self.d_key

    @property
    def d_half(self) -> int:
        """Features of one sub-key, ``d_key // 2``."""
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
        """Every field by name (JSON-serialisable; checkpoints store it, SPEC §12)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PEERConfig:
        """The config of ``to_dict``'s output; unknown fields raise ``PEERConfigError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PEERConfigError(f"PEERConfig got unknown field(s) {unknown}, but expected only {sorted(known)}")
        return cls(**data)
