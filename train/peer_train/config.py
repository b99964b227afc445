"""The model and training configuration: plain data, shared by every framework's model.

The model is a pre-norm decoder-only transformer over bytes: token and learned position
embeddings, ``n_layers`` blocks of (LayerNorm -> causal self-attention -> residual,
LayerNorm -> feed-forward -> residual), a final LayerNorm and an untied output projection.
Every block's feed-forward is a dense FFN (``gelu(x W1 + b1) W2 + b2``, width ``ffn_width``)
except the blocks listed by ``peer_blocks`` (the middle block, as in the paper's §3
experiments, or all blocks), whose feed-forward is:

  ``ffn="peer"``   a PEER layer (``peer_backends.layer``) configured by ``peer``;
  ``ffn="dense"``  a dense FFN of width ``dense_width(PEER's forward FLOPs per token)``, i.e.
                   the equal-FLOP dense baseline of the benchmark (bench/peer_bench/formulas.py);
  ``ffn="peer_glu"`` a PEER layer with GLU experts (SPEC §3.10, ``expert_glu=True``) and the
                   configured ``n_experts``, ``peer_heads`` and ``d_key``, whose ``topk`` is the
                   one giving the forward FLOPs per token nearest to the configured PEER layer's
                   (a GLU expert costs 1.5x a single-neuron one, so fewer experts are selected).

So "dense", "peer" and "peer_glu" models have the same FLOPs per token up to the rounding of one
width (dense) or of one top-k step (peer_glu); ``flops_per_token`` counts what is actually built.
"""

from __future__ import annotations

import dataclasses
import math

from peer_bench import formulas
from peer_ref import PEERConfig

from .data import VOCAB

FFNS = ("dense", "peer", "peer_glu")
PEER_BLOCKS = ("middle", "all")
# Training precisions: float32 throughout, or float32 master weights with 16-bit matmuls
# (torch.autocast / Flax ``dtype=``; the PEER layers' mixed mode, SPEC §10.3). float16 adds
# loss scaling (torch.amp.GradScaler), offered for torch only.
PRECISIONS = ("float32", "bfloat16", "float16")
PRECISION_ALIASES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


class ConfigError(ValueError):
    """A training or model setting out of range."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    d_model: int = 64
    n_layers: int = 3
    n_heads: int = 4
    seq: int = 128
    ffn_width: int = 256
    ffn: str = "peer"
    peer_blocks: str = "middle"
    n_experts: int = 32**2
    peer_heads: int = 8
    topk: int = 8
    d_key: int = 32
    query_norm: str = "batch"
    vocab: int = VOCAB

    def __post_init__(self):
        for name in (
            "d_model",
            "n_layers",
            "n_heads",
            "seq",
            "ffn_width",
            "n_experts",
            "peer_heads",
            "topk",
            "d_key",
            "vocab",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r}, but expected an int >= 1")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"d_model={self.d_model} with n_heads={self.n_heads}, but expected d_model divisible by n_heads"
            )
        if self.ffn not in FFNS:
            raise ConfigError(f"ffn={self.ffn!r}, but expected one of {FFNS}")
        if self.peer_blocks not in PEER_BLOCKS:
            raise ConfigError(f"peer_blocks={self.peer_blocks!r}, but expected one of {PEER_BLOCKS}")
        self.peer_config()  # validates the PEER fields through PEERConfig

    def reference_peer_config(self) -> PEERConfig:
        """The configured PEER layer (SPEC §1), the FLOP reference of the "dense" and "peer_glu"
        stand-ins; its errors name PEERConfig's fields."""
        return PEERConfig(
            d_model=self.d_model,
            n_experts=self.n_experts,
            heads=self.peer_heads,
            topk=self.topk,
            d_key=self.d_key,
            query_norm=self.query_norm,
        )

    def peer_config(self) -> PEERConfig:
        """The PEER layer the model builds: the reference one, or for ``ffn="peer_glu"`` its GLU
        stand-in with ``topk = equal_flop_glu_topk()``."""
        cfg = self.reference_peer_config()
        if self.ffn != "peer_glu":
            return cfg
        return dataclasses.replace(cfg, expert_glu=True, topk=self.equal_flop_glu_topk())

    def equal_flop_glu_topk(self) -> int:
        """The top-k (1..isqrt(n_experts)) whose GLU layer's forward FLOPs per token are nearest to
        ``peer_flops()`` (the smaller one on a tie)."""
        target = self.peer_flops()
        return min(range(1, math.isqrt(self.n_experts) + 1), key=lambda k: (abs(self._flops(k, True) - target), k))

    def _flops(self, topk: int, expert_glu: bool) -> int:
        return formulas.peer_flops_per_token(
            self.d_model, self.n_experts, self.peer_heads, topk, self.d_key, expert_glu=expert_glu
        )["total"]

    def replaced(self) -> list[int]:
        """Indices of the blocks whose feed-forward is PEER (or its equal-FLOP dense stand-in)."""
        return list(range(self.n_layers)) if self.peer_blocks == "all" else [self.n_layers // 2]

    def peer_flops(self) -> int:
        """Forward FLOPs per token of the configured (reference) PEER layer."""
        return self._flops(self.topk, False)

    def built_peer_flops(self) -> int:
        """Forward FLOPs per token of the PEER layer the model builds (``peer_config()``)."""
        cfg = self.peer_config()
        return self._flops(cfg.topk, cfg.expert_glu)

    def equal_flop_width(self) -> int:
        return formulas.dense_width(self.peer_flops(), self.d_model)

    def block_ffns(self) -> list[tuple[str, int]]:
        """Each block's feed-forward: ("dense", width) or ("peer", 0) (``peer_config()``'s layer)."""
        out = []
        for i in range(self.n_layers):
            if i not in self.replaced():
                out.append(("dense", self.ffn_width))
            elif self.ffn in ("peer", "peer_glu"):
                out.append(("peer", 0))
            else:
                out.append(("dense", self.equal_flop_width()))
        return out

    def flops_per_token(self) -> dict[str, int]:
        """Forward FLOPs per token by term (formulas.transformer_flops_per_token)."""
        ffn = [
            self.built_peer_flops() if kind == "peer" else formulas.dense_flops_per_token(width, self.d_model)
            for kind, width in self.block_ffns()
        ]
        return formulas.transformer_flops_per_token(self.d_model, self.n_layers, self.seq, self.vocab, ffn)

    def train_flops_per_token(self) -> int:
        return formulas.mode_factor("forward_backward") * self.flops_per_token()["total"]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule, evaluation and precision of one run.

    ``precision`` is one of ``PRECISIONS``: "float32" computes everything in float32;
    "bfloat16" and "float16" are mixed precision as each framework trains it: float32
    parameters (the master weights), gradients and optimiser state; the forward's matmuls
    (attention projections, attention, dense FFNs, output head) in the 16-bit dtype, the PEER
    layer in its mixed mode (SPEC §10.3: 16-bit rows and output, float32 routing and
    statistics); embeddings, LayerNorm, the residual stream and the loss in float32. torch runs
    the forward under ``torch.autocast``; JAX gives the model's layers ``dtype=`` the 16-bit
    dtype and ``param_dtype=float32``. "float16" adds dynamic loss scaling
    (``torch.amp.GradScaler``) and is offered for torch only.

    ``sparse`` (bool, default False) trains the PEER layers' expert tables (``peer_ref.
    EXPERT_TABLES``) from their row-sparse gradients (SPEC §7.1) with a lazy Adam that updates
    only the rows a step selected (torch: the layer's ``sparse=True`` and
    ``torch.optim.SparseAdam``; JAX: ``optax.adam`` on the selected rows), at the same learning
    rate schedule and betas and without weight decay; every other parameter keeps the AdamW
    above. It needs a model with PEER layers (``ffn`` "peer" or "peer_glu").
    """

    steps: int = 600
    batch: int = 16
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.1
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 8
    precision: str = "float32"
    sparse: bool = False

    def __post_init__(self):
        for name in ("steps", "batch", "eval_every", "eval_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r}, but expected an int >= 1")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"warmup={self.warmup!r}, but expected an int >= 0")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed={self.seed!r}, but expected an int >= 0")
        for name, low, high in (
            ("lr", 0.0, 1.0),
            ("weight_decay", 0.0, 10.0),
            ("beta2", 0.0, 1.0),
            ("grad_clip", 0.0, math.inf),
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
                raise ConfigError(f"{name}={value!r}, but expected a finite float in [{low}, {high}]")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r}, but expected one of {PRECISIONS}")
        if not isinstance(self.sparse, bool):
            raise ConfigError(f"sparse={self.sparse!r}, but expected a bool")

    def lr_at(self, step: int) -> float:
        """Linear warm-up over ``warmup`` steps, then cosine decay to 10% at ``steps``."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_sparse(model_cfg: ModelConfig, train_cfg: TrainConfig) -> None:
    """Raise ConfigError where ``train_cfg.sparse`` cannot apply: a model without PEER layers."""
    if train_cfg.sparse and model_cfg.ffn == "dense":
        raise ConfigError(
            "sparse=True with ffn='dense', but expected ffn 'peer' or 'peer_glu': sparse training "
            "steps the PEER layers' expert tables, and a dense FFN model has none"
        )
