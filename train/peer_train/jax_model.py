"""The transformer of ``peer_train.config`` in JAX with Flax NNX, and its training engine.

Standard parts only: ``nnx.Embed``, ``nnx.LayerNorm``, ``nnx.Linear``,
``jax.nn.dot_product_attention(is_causal=True)``, ``optax.adamw`` behind
``optax.clip_by_global_norm``, ``nnx.Optimizer``, ``nnx.jit``; the PEER feed-forward is
``peer_backends.layer(cfg, "jax")``. Mixed precision (``TrainConfig.precision="bfloat16"``) is
Flax's own recipe: every ``nnx.Linear`` and the PEER layer take ``dtype=jnp.bfloat16`` with
``param_dtype=jnp.float32`` (the PEER layer's mixed mode, SPEC §10.3), while embeddings,
LayerNorm, the residual stream and the loss stay float32, as under ``torch.autocast``; float16
would need loss scaling, which this engine does not implement. With ``TrainConfig.sparse`` the
step takes ``peer_backends.jax.sparse_value_and_grad`` (the expert tables' gradients as
``RowSparse`` rows, SPEC §7.1), steps the tables with ``peer_backends.jax.RowOptimizer`` over
``optax.adam`` (a lazy optimizer: only the listed rows, in place) and every other parameter with
``optax.adamw`` (``wrt=DENSE_PARAMS``), clipping by the global norm over both, in one ``nnx.jit``
that donates the model and both optimizers. Checkpoints are ``.npz`` files of the model's and the
optimisers' arrays keyed by their pytree paths (no pickled code).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import peer_backends
from peer_backends import jax as peer_jax

from .config import ConfigError, ModelConfig, TrainConfig

COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


class DenseFFN(nnx.Module):
    def __init__(self, d_model: int, width: int, rngs: nnx.Rngs, dtype=None):
        self.up = nnx.Linear(d_model, width, dtype=dtype, rngs=rngs)
        self.down = nnx.Linear(width, d_model, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x), approximate=False))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, kind: str, width: int, rngs: nnx.Rngs, dtype=None):
        self.n_heads = cfg.n_heads
        self.ln1 = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.qkv = nnx.Linear(cfg.d_model, 3 * cfg.d_model, dtype=dtype, rngs=rngs)
        self.proj = nnx.Linear(cfg.d_model, cfg.d_model, dtype=dtype, rngs=rngs)
        self.ln2 = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.is_peer = kind == "peer"
        if self.is_peer:
            self.ffn = peer_backends.layer(
                cfg.peer_config(), backend="jax", rngs=rngs, dtype=dtype, param_dtype=jnp.float32
            )
        else:
            self.ffn = DenseFFN(cfg.d_model, width, rngs, dtype)

    def __call__(self, x):
        b, t, d = x.shape
        q, k, v = jnp.split(self.qkv(self.ln1(x)).reshape(b, t, 3 * self.n_heads, d // self.n_heads), 3, axis=2)
        a = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.reshape(b, t, d))
        h = self.ln2(x)
        if self.is_peer:
            y, aux = self.ffn(h, return_aux=True)
            return x + y, (h, y, aux["indices"], aux["weights"])
        return x + self.ffn(h), None


class Transformer(nnx.Module):
    """Bytes (int32, (batch, seq)) -> logits ((batch, seq, vocab), in ``dtype``: float32 by
    default), and each PEER block's (input, output, indices, weights). ``dtype`` is the
    computation dtype of the Linear and PEER layers (parameters are float32 either way)."""

    def __init__(self, cfg: ModelConfig, seed: int, dtype=None):
        rngs = nnx.Rngs(seed)
        self.cfg = cfg
        init = nnx.initializers.normal(0.02)
        self.embed = nnx.Embed(cfg.vocab, cfg.d_model, embedding_init=init, rngs=rngs)
        self.pos = nnx.Embed(cfg.seq, cfg.d_model, embedding_init=init, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, kind, width, rngs, dtype) for kind, width in cfg.block_ffns()])
        self.ln_f = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.head = nnx.Linear(cfg.d_model, cfg.vocab, use_bias=False, kernel_init=init, dtype=dtype, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.pos(jnp.arange(tokens.shape[1]))[None]
        routed = {}
        for i, block in enumerate(self.blocks):
            x, seen = block(x)
            if seen is not None:
                routed[i] = seen
        return self.head(self.ln_f(x)), routed


def _loss(model, tokens):
    logits, routed = model(tokens[:, :-1])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens[:, 1:])
    return losses, routed


@nnx.jit
def _train_step(model, optimizer, tokens):
    def loss_fn(m):
        losses, _ = _loss(m, tokens)
        return losses.mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def _is_row_sparse(x) -> bool:
    return isinstance(x, peer_jax.RowSparse)


def _clip_by_global_norm(grads, table_grads, max_norm: float):
    """Both gradient trees scaled as ``optax.clip_by_global_norm(max_norm)`` scales one: by
    ``max_norm / norm`` where the global norm over the dense gradients and the listed rows
    (the rest of a row-sparse gradient is zero; its padding rows are zeros) exceeds it."""
    rows = jax.tree.leaves(table_grads, is_leaf=_is_row_sparse)
    norm = optax.tree.norm([*jax.tree.leaves(grads), *(r.values for r in rows)])
    scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
    grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
    table_grads = jax.tree.map(
        lambda r: peer_jax.RowSparse(r.rows, r.values * scale.astype(r.values.dtype), r.count),
        table_grads,
        is_leaf=_is_row_sparse,
    )
    return grads, table_grads


@nnx.jit(donate_argnums=(0, 1, 2), static_argnums=(4,))
def _sparse_train_step(model, optimizer, row_optimizer, tokens, clip: float):
    def loss_fn(m):
        losses, _ = _loss(m, tokens)
        return losses.mean()

    loss, (grads, table_grads) = peer_jax.sparse_value_and_grad(loss_fn)(model)
    if clip > 0:
        grads, table_grads = _clip_by_global_norm(grads, table_grads, clip)
    optimizer.update(model, grads)
    row_optimizer.update(model, table_grads)
    return loss, jax.tree.map(lambda r: r.count, table_grads, is_leaf=_is_row_sparse)


def _listed_by_block(counts) -> dict[int, int]:
    """Per transformer block, the number of rows the step listed in its PEER layer's
    ``experts.down`` (``counts``: the tables' tree of RowSparse counts)."""
    out = {}
    for path, count in jax.tree_util.tree_flatten_with_path(counts)[0]:
        keys = [getattr(k, "key", getattr(k, "idx", k)) for k in path]
        if keys[-2:] == ["experts", "down"]:
            out[int(keys[keys.index("blocks") + 1])] = int(count)
    return out


@nnx.jit
def _eval_step(model, tokens):
    losses, routed = _loss(model, tokens)
    return losses.sum(), routed


class Engine:
    """One model and its optimiser: step, evaluate, routing, state for checkpoints."""

    framework = "jax"

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, device: str = "cpu"):
        # JAX places everything on its default device: the GPU when jax[cuda] sees one, else the
        # CPU (the command line sets JAX_PLATFORMS=cpu for --device cpu before importing JAX).
        platform = jax.default_backend()
        if (device == "cuda") != (platform == "gpu"):
            raise RuntimeError(f"device={device!r}, but JAX's default backend is {platform!r}")
        if train_cfg.precision not in COMPUTE_DTYPES:
            raise ConfigError(
                f"precision={train_cfg.precision!r} with the JAX engine, but expected one of "
                f"{tuple(COMPUTE_DTYPES)}: float16 training needs loss scaling, which this "
                "trainer implements for torch only (torch.amp.GradScaler)"
            )
        self.model = Transformer(model_cfg, train_cfg.seed, COMPUTE_DTYPES[train_cfg.precision])
        table = jnp.asarray([train_cfg.lr_at(s) for s in range(train_cfg.steps)], jnp.float32)

        def schedule(count):
            return table[jnp.minimum(count, train_cfg.steps - 1)]

        def decay(params):
            return jax.tree.map(lambda p: p.ndim >= 2, params)

        adamw = optax.adamw(schedule, b1=0.9, b2=train_cfg.beta2, weight_decay=train_cfg.weight_decay, mask=decay)
        self.sparse, self.clip, self.weight_decay = train_cfg.sparse, float(train_cfg.grad_clip), train_cfg.weight_decay
        self.n_experts = model_cfg.n_experts
        self._listed = {i: [] for i, (kind, _) in enumerate(model_cfg.block_ffns()) if kind == "peer"}
        if self.sparse:
            # The expert tables: a lazy Adam on their listed rows (SPEC §7.1); the rest: AdamW.
            # Clipping spans both, so it happens in the step (_clip_by_global_norm).
            self.opt = nnx.Optimizer(self.model, adamw, wrt=peer_jax.DENSE_PARAMS)
            self.row_opt = peer_jax.RowOptimizer(self.model, optax.adam(schedule, b1=0.9, b2=train_cfg.beta2))
        else:
            parts = [optax.clip_by_global_norm(train_cfg.grad_clip)] if train_cfg.grad_clip > 0 else []
            self.opt = nnx.Optimizer(self.model, optax.chain(*parts, adamw), wrt=nnx.Param)
            self.row_opt = None

    def optimizer_description(self) -> dict:
        """The optimizer of the expert tables and of every other parameter, for the record."""
        adamw = f"optax.adamw (weight decay {self.weight_decay:g} on matrices)"
        tables = "optax.adam on the listed rows (peer_backends.jax.RowOptimizer; lazy, no weight decay)"
        return {"expert_tables": tables if self.sparse else adamw, "other": adamw}

    def rows_listed(self) -> dict | None:
        """Per PEER block, the mean fraction of expert-table rows the sparse steps of this engine
        listed (SPEC §7.1); None when not sparse."""
        if not self.sparse:
            return None
        return {str(i): float(np.mean(f)) if f else None for i, f in self._listed.items()}

    def n_params(self) -> int:
        return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(self.model, nnx.Param)))

    def _tokens(self, batch: np.ndarray):
        return jnp.asarray(batch, jnp.int32)

    def step(self, batch: np.ndarray) -> float:
        self.model.train()
        if not self.sparse:
            return float(_train_step(self.model, self.opt, self._tokens(batch)))
        loss, counts = _sparse_train_step(self.model, self.opt, self.row_opt, self._tokens(batch), self.clip)
        for block, count in _listed_by_block(counts).items():
            self._listed[block].append(count / self.n_experts)
        return float(loss)

    def evaluate(self, batches: list[np.ndarray], routing: bool = False):
        self.model.eval()
        total, count, aux = 0.0, 0, {}
        for batch in batches:
            loss, routed = _eval_step(self.model, self._tokens(batch))
            total += float(loss)
            count += batch[:, 1:].size
            if routing:
                for i, (_, _, indices, weights) in routed.items():
                    aux.setdefault(i, []).append((np.asarray(indices), np.asarray(weights)))
        return (total / count, aux) if routing else total / count

    def _arrays(self) -> tuple[list, object]:
        pure = {"model": nnx.to_pure_dict(nnx.state(self.model)), "opt": nnx.to_pure_dict(nnx.state(self.opt))}
        if self.row_opt is not None:
            pure["row_opt"] = nnx.to_pure_dict(nnx.state(self.row_opt))
        return jax.tree_util.tree_flatten_with_path(pure)

    def save(self, path, extra: dict) -> None:
        import json

        leaves, _ = self._arrays()
        arrays = {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}
        with open(path, "wb") as f:
            np.savez(f, __extra__=np.frombuffer(json.dumps(extra).encode(), np.uint8), **arrays)

    def load(self, path) -> dict:
        import json

        leaves, treedef = self._arrays()
        with np.load(path, allow_pickle=False) as stored:
            values = [jnp.asarray(stored[jax.tree_util.keystr(p)], dtype=jnp.asarray(v).dtype) for p, v in leaves]
            extra = json.loads(stored["__extra__"].tobytes().decode())
        pure = jax.tree_util.tree_unflatten(treedef, values)
        objects = [(self.model, "model"), (self.opt, "opt")] + ([(self.row_opt, "row_opt")] if self.row_opt else [])
        for obj, name in objects:
            state = nnx.state(obj)
            nnx.replace_by_pure_dict(state, pure[name])
            nnx.update(obj, state)
        return extra
