"""The transformer of ``peer_train.config`` in PyTorch, and its training engine.

Standard parts only: ``nn.Embedding``, ``nn.LayerNorm``, ``nn.Linear``,
``F.scaled_dot_product_attention(is_causal=True)``, ``torch.optim.AdamW`` with a ``LambdaLR``
schedule, ``clip_grad_norm_``; the PEER feed-forward is ``peer_backends.layer(cfg, "torch")``.
With ``TrainConfig.sparse`` the PEER layers are built with ``sparse=True`` (their expert tables'
``.grad`` are coalesced sparse COO tensors, SPEC §7.1, as ``nn.Embedding(sparse=True)``'s), the
tables are stepped by ``torch.optim.SparseAdam`` and the rest by AdamW, each with the schedule.
Mixed precision (``TrainConfig.precision``) is torch's own recipe: float32 parameters, the
forward (training and evaluation) under ``torch.autocast(device_type, dtype)``, the loss and
the backward outside it, and for float16 ``torch.amp.GradScaler``.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import peer_backends

from .config import ModelConfig, TrainConfig


class DenseFFN(nn.Module):
    def __init__(self, d_model: int, width: int):
        super().__init__()
        self.up = nn.Linear(d_model, width)
        self.down = nn.Linear(width, d_model)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, kind: str, width: int, device, sparse: bool = False):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        if kind == "peer":
            # Drawn from torch's generator, seeded once for the whole model (Transformer).
            extra = {"sparse": True} if sparse else {}
            self.ffn = peer_backends.layer(cfg.peer_config(), backend="torch", device=device, **extra)
        else:
            self.ffn = DenseFFN(cfg.d_model, width)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.ffn(self.ln2(x))


class Transformer(nn.Module):
    """Bytes (int, (batch, seq)) -> logits (float32, (batch, seq, vocab)); ``sparse`` builds the
    PEER layers with row-sparse expert-table gradients."""

    def __init__(self, cfg: ModelConfig, seed: int, device="cpu", sparse: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg, kind, width, device, sparse) for kind, width in cfg.block_ffns())
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        nn.init.normal_(self.head.weight, std=0.02)
        self.to(device)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def peer_layers(self) -> dict[int, nn.Module]:
        return {i: b.ffn for i, b in enumerate(self.blocks) if not isinstance(b.ffn, DenseFFN)}


def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for gradients that may be sparse COO tensors, which
    torch's own refuses: the total norm by ``get_total_norm`` (a sparse gradient as its coalesced
    values, its other rows being zero), then ``clip_grads_with_norm_``, which scales sparse
    gradients too. Returns the total norm."""
    parameters = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(
        [p.grad.coalesce().values() if p.grad.is_sparse else p.grad for p in parameters]
    )
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm


@contextlib.contextmanager
def _routing_recorded(layer, record):
    """While open, every call of the PEER ``layer`` runs with ``return_aux=True`` (a forward pre-hook)
    and hands ``(x, y, aux)`` to ``record`` (a forward hook), the caller still receiving y alone."""

    def ask(module, args, kwargs):
        return args, {**kwargs, "return_aux": True}

    def give(module, args, out):
        y, aux = out
        record(args[0], y, aux)
        return y

    hooks = [layer.register_forward_pre_hook(ask, with_kwargs=True), layer.register_forward_hook(give)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


class Engine:
    """One model and its optimiser: step, evaluate, routing, state for checkpoints."""

    framework = "torch"

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, device: str = "cpu"):
        self.device = torch.device(device)
        self.sparse = train_cfg.sparse
        self.model = Transformer(model_cfg, train_cfg.seed, self.device, sparse=self.sparse)
        tables = (
            [p for layer in self.model.peer_layers().values() for p in layer.sparse_parameters()] if self.sparse else []
        )
        rest = [p for p in self.model.parameters() if not any(p is t for t in tables)]
        decay = [p for p in rest if p.ndim >= 2]
        no_decay = [p for p in rest if p.ndim < 2]
        self.weight_decay = train_cfg.weight_decay
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": train_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=train_cfg.lr,
            betas=(0.9, train_cfg.beta2),
        )
        # The lazy optimizer of the expert tables (SPEC §7.1): SparseAdam takes no weight decay.
        self.sparse_opt = (
            torch.optim.SparseAdam(tables, lr=train_cfg.lr, betas=(0.9, train_cfg.beta2)) if tables else None
        )
        self.optimizers = [self.opt] + ([self.sparse_opt] if tables else [])
        self.scheds = [
            torch.optim.lr_scheduler.LambdaLR(opt, lambda s: train_cfg.lr_at(s) / train_cfg.lr)
            for opt in self.optimizers
        ]
        self.sched = self.scheds[0]
        self._listed = {i: [] for i in self.model.peer_layers()}  # rows listed per step, sparse
        self.clip = train_cfg.grad_clip
        self.amp_dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[train_cfg.precision]
        # Loss scaling for float16 only (bfloat16 has float32's exponent range); disabled, every
        # scaler call passes through.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _logits(self, tokens):
        """Float32 logits of ``tokens`` (batch, seq), the model run under autocast when mixed."""
        with self._autocast():
            logits = self.model(tokens)
        return logits.float()

    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def rows_listed(self) -> dict | None:
        """Per PEER block, the mean fraction of expert-table rows the sparse steps of this engine
        listed (SPEC §7.1); None when not sparse."""
        if not self.sparse:
            return None
        return {str(i): float(np.mean(f)) if f else None for i, f in self._listed.items()}

    def optimizer_description(self) -> dict:
        """The optimizer of the expert tables and of every other parameter, for the record."""
        adamw = f"torch.optim.AdamW (weight decay {self.weight_decay:g} on matrices)"
        tables = "torch.optim.SparseAdam (lazy, no weight decay)" if self.sparse else adamw
        return {"expert_tables": tables, "other": adamw}

    def _tensor(self, batch: np.ndarray):
        return torch.from_numpy(batch).long().to(self.device)

    def step(self, batch: np.ndarray) -> float:
        self.model.train()
        tokens = self._tensor(batch)
        logits = self._logits(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.sparse:
            for i, layer in self.model.peer_layers().items():
                grad = layer.experts.down.grad.coalesce()  # one entry per listed row
                self._listed[i].append(grad._nnz() / grad.shape[0])
        if self.clip > 0:
            for opt in self.optimizers:
                self.scaler.unscale_(opt)
            if self.sparse:
                clip_grad_norm_(self.model.parameters(), self.clip)
            else:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        for opt in self.optimizers:
            self.scaler.step(opt)  # skipped when a float16 gradient overflowed
        self.scaler.update()
        for sched in self.scheds:
            sched.step()
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self, batches: list[np.ndarray], routing: bool = False):
        """Mean cross-entropy (nats per byte) over ``batches`` in evaluation mode; with ``routing``
        also, per PEER block, the list of (indices, weights) NumPy arrays of each batch."""
        self.model.eval()
        total, count, aux = 0.0, 0, {i: [] for i in self.model.peer_layers()}
        with contextlib.ExitStack() as stack:
            if routing:
                for i, layer in self.model.peer_layers().items():
                    stack.enter_context(
                        _routing_recorded(
                            layer,
                            lambda x, y, a, i=i: aux[i].append(
                                (a["indices"].cpu().numpy(), a["weights"].cpu().numpy())
                            ),
                        )
                    )
            for batch in batches:
                tokens = self._tensor(batch)
                logits = self._logits(tokens[:, :-1])
                total += float(
                    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="sum")
                )
                count += tokens[:, 1:].numel()
        return (total / count, aux) if routing else total / count

    @torch.no_grad()
    def peer_inputs(self, batches: list[np.ndarray], block: int) -> list[np.ndarray]:
        """The inputs of block ``block``'s PEER layer on ``batches`` (evaluation mode, float32 whatever
        the training precision: the trained float32 parameters), via forward hooks."""
        self.model.eval()
        seen = []
        with _routing_recorded(
            self.model.blocks[block].ffn,
            lambda x, y, a: seen.append(
                (x.cpu().numpy().copy(), y.cpu().numpy().copy(), a["indices"].cpu().numpy(), a["weights"].cpu().numpy())
            ),
        ):
            for batch in batches:
                self.model(self._tensor(batch)[:, :-1])
        return seen

    def peer_layer(self, block: int):
        return self.model.blocks[block].ffn

    def state_dict(self) -> dict:
        state = {
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
        }
        if self.sparse_opt is not None:
            state.update(sparse_opt=self.sparse_opt.state_dict(), sparse_sched=self.scheds[1].state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        if self.sparse_opt is not None:
            self.sparse_opt.load_state_dict(state["sparse_opt"])
            self.scheds[1].load_state_dict(state["sparse_sched"])
        if state.get("scaler"):  # empty when loss scaling is off
            self.scaler.load_state_dict(state["scaler"])

    def save(self, path, extra: dict) -> None:
        torch.save({"engine": self.state_dict(), "extra": extra}, path)

    def load(self, path) -> dict:
        blob = torch.load(path, map_location=self.device, weights_only=True)
        self.load_state_dict(blob["engine"])
        return blob["extra"]
