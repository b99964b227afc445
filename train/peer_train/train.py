"""One training run, in either framework: the loop, evaluation, routing metrics, checkpoints."""

from __future__ import annotations

import math
import time
from pathlib import Path

from peer_ref import metrics

from . import data
from .config import ModelConfig, TrainConfig, check_sparse

TRAIN_BACKENDS = ("torch", "jax")
DEVICES = ("cpu", "cuda")
LN2 = math.log(2)


class ResumeError(ValueError):
    """A checkpoint that does not belong to the run being resumed."""


def engine(backend: str, model_cfg: ModelConfig, train_cfg: TrainConfig, device: str):
    """The framework's Engine (imports the framework only now); ConfigError where
    ``train_cfg.sparse`` cannot apply (``config.check_sparse``)."""
    check_sparse(model_cfg, train_cfg)
    if backend == "torch":
        from .torch_model import Engine
    elif backend == "jax":
        from .jax_model import Engine
    else:
        raise ValueError(f"backend={backend!r}, but expected one of {TRAIN_BACKENDS}")
    return Engine(model_cfg, train_cfg, device)


def routing_metrics(model_cfg: ModelConfig, aux: dict) -> dict:
    """Expert usage and unevenness (peer_ref.metrics, SPEC §11) of each PEER block."""
    cfg = model_cfg.peer_config()
    out = {}
    for block, batches in aux.items():
        totals = None
        for indices, weights in batches:
            totals = metrics.accumulate(cfg, indices, weights, into=totals)
        out[str(block)] = {"usage": metrics.usage(totals), "unevenness": metrics.unevenness(totals)}
    return out


def checkpoint_path(out_dir: Path, backend: str) -> Path:
    return Path(out_dir) / ("checkpoint.pt" if backend == "torch" else "checkpoint.npz")


def run(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    corpus: data.Corpus,
    *,
    backend: str = "torch",
    device: str = "cpu",
    out_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    progress=None,
    label: str = "train",
    stop_after: int | None = None,
    keep_engine: bool = False,
) -> dict:
    """Train one model; return its record (losses, evaluations, routing metrics, speed).

    ``checkpoint_every`` > 0 writes ``out_dir/checkpoint.{pt,npz}`` every that many steps and at
    the end; ``resume`` continues from it (refusing one written for other settings). Batches
    depend only on (seed, step), so a resumed run reproduces the uninterrupted one.
    ``stop_after`` ends the loop early after that many steps (to test resuming).
    ``train_cfg.precision`` picks float32 or mixed-precision training (``TrainConfig``); the
    parameters, optimiser state and checkpoints are float32 either way. ``train_cfg.sparse``
    steps the expert tables with the framework's lazy optimizer on their row-sparse gradients
    (``TrainConfig``); the record's "optimizer" names the optimizer of each parameter group and
    its "rows_listed" gives, per PEER block, the mean fraction of table rows a step listed
    (None when not sparse).
    """
    eng = engine(backend, model_cfg, train_cfg, device)
    val = data.val_batches(corpus.val, train_cfg.batch, model_cfg.seq, train_cfg.eval_batches)
    tokens_per_step = train_cfg.batch * model_cfg.seq
    flops_per_token = model_cfg.train_flops_per_token()
    settings = {
        "model": model_cfg.to_dict(),
        "train": train_cfg.to_dict(),
        "backend": backend,
        "corpus_sha256": corpus.sha256,
    }
    losses, evals, start = [], [], 0
    ckpt = checkpoint_path(out_dir, backend) if out_dir is not None else None
    if resume:
        if ckpt is None or not ckpt.exists():
            raise ResumeError(f"--resume: no checkpoint at {str(ckpt)!r} to resume from")
        extra = eng.load(ckpt)
        # written before precision and sparse were settings
        extra["settings"]["train"].setdefault("precision", "float32")
        extra["settings"]["train"].setdefault("sparse", False)
        if extra["settings"] != settings:
            raise ResumeError(
                f"--resume: {str(ckpt)!r} was written by a run with other settings; use the same flags or another --out"
            )
        losses, evals, start = extra["losses"], extra["evals"], extra["step"]

    def evaluate(step):
        nats = eng.evaluate(val)
        tokens = step * tokens_per_step
        evals.append({"step": step, "tokens": tokens, "train_flops": tokens * flops_per_token, "val_bpb": nats / LN2})

    def save(step):
        if ckpt is not None and checkpoint_every > 0:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            eng.save(ckpt, {"settings": settings, "step": step, "losses": losses, "evals": evals})

    task = (
        progress.add_task(label, total=train_cfg.steps, completed=start, loss=float("nan"), tps=0.0)
        if progress is not None
        else None
    )
    began, trained = time.perf_counter(), 0
    end = train_cfg.steps if stop_after is None else min(train_cfg.steps, start + stop_after)
    for step in range(start, end):
        loss = eng.step(data.train_batch(corpus.train, train_cfg.seed, step, train_cfg.batch, model_cfg.seq))
        if not math.isfinite(loss):
            raise FloatingPointError(f"{label}: the training loss is {loss} at step {step}; lower --lr")
        losses.append(loss)
        trained += 1
        done = step + 1
        if done % train_cfg.eval_every == 0 or done == train_cfg.steps:
            evaluate(done)
        if checkpoint_every > 0 and (done % checkpoint_every == 0 or done == end):
            save(done)
        if task is not None:
            progress.update(
                task, completed=done, loss=loss, tps=trained * tokens_per_step / (time.perf_counter() - began)
            )
    wall = time.perf_counter() - began
    record = {
        "label": label,
        "backend": backend,
        "device": device,
        "precision": train_cfg.precision,
        "sparse": train_cfg.sparse,
        "optimizer": eng.optimizer_description(),
        "rows_listed": eng.rows_listed(),
        "model": model_cfg.to_dict(),
        "train": train_cfg.to_dict(),
        "n_params": eng.n_params(),
        "flops_per_token_forward": model_cfg.flops_per_token(),
        "train_flops_per_token": flops_per_token,
        "tokens_per_step": tokens_per_step,
        "losses": losses,
        "evals": evals,
        "wall_s": wall,
        "tokens_per_s": trained * tokens_per_step / wall if wall > 0 else None,
        "completed_steps": end,
    }
    if end == train_cfg.steps:
        nats, aux = eng.evaluate(val, routing=True)
        record["val_bpb"] = nats / LN2
        record["train_flops"] = train_cfg.steps * tokens_per_step * flops_per_token
        record["routing"] = routing_metrics(model_cfg, aux)
    if keep_engine:
        record["engine"] = eng
    return record
