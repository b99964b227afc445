"""``python -m peer_train``: train one model, or run an experiment and write its report.

    python -m peer_train train [--ffn peer|dense] [--steps N] [--sparse] [--checkpoint-every K] [--resume] ...
    python -m peer_train isoflop | usage | transfer | pool | all [--quick] [--out DIR]

Every command takes --data, --device, --backend, --threads, --seed, --out, --precision and
--no-progress; the experiments also take --quick. --precision float32 (default) trains in float32;
bf16 trains in mixed precision: float32 weights and optimiser state, the forward's matmuls and the
PEER layers in bfloat16 (torch.autocast in torch, dtype=bfloat16 with param_dtype=float32 in Flax;
SPEC §10.3), the loss in float32; fp16 is the same in float16 with torch.amp.GradScaler loss
scaling, torch only. train --sparse steps the PEER layers' expert tables from their row-sparse
gradients (SPEC 7.1) with a lazy Adam (torch.optim.SparseAdam; optax.adam on the selected rows in
JAX) and every other parameter with AdamW. Bad flags and unreadable data exit with status 2 and one
line naming the flag, the value and what was expected.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import time
from pathlib import Path

from peer_ref.config import QUERY_NORMS

from .config import FFNS, PEER_BLOCKS, PRECISION_ALIASES, ConfigError, ModelConfig, TrainConfig
from .data import DataError
from .train import DEVICES, TRAIN_BACKENDS, ResumeError

EXPERIMENTS = ("isoflop", "usage", "transfer", "pool")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m peer_train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--data",
        default=None,
        metavar="PATH",
        help="a text file or a directory of text files (default: this Python's standard library)",
    )
    common.add_argument("--out", default=None, metavar="DIR", help="output folder (default: peer_train_out/<command>)")
    common.add_argument("--device", default="cpu", choices=DEVICES)
    common.add_argument(
        "--backend",
        default="torch",
        choices=TRAIN_BACKENDS,
        help="framework of the model (transfer always trains in torch)",
    )
    common.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads per framework (default 1: these models' operations are too small "
        "for threads to pay, and extra threads slow a shared machine down badly)",
    )
    common.add_argument("--seed", type=int, default=None, help="seed (default 0; isoflop, pool: their size's seeds)")
    (
        common.add_argument(
            "--precision",
            default="float32",
            metavar="{float32,bf16,fp16}",
            help="float32 (default; alias fp32); bf16 (alias bfloat16): mixed precision with float32 "
            "weights, the forward under torch.autocast / Flax dtype=bfloat16 and the PEER layers "
            "in their mixed mode (SPEC 10.3), the loss in float32; fp16 (alias float16): the same "
            "in float16 with torch.amp.GradScaler loss scaling, --backend torch only",
        ),
    )
    common.add_argument("--no-progress", action="store_true", help="no progress bar")
    train = sub.add_parser("train", parents=[common], help="train one model and write train.json")
    d_model, d_train = ModelConfig(), TrainConfig()
    for field in dataclasses.fields(ModelConfig):
        if field.name == "vocab":
            continue
        kwargs = (
            {"choices": {"ffn": FFNS, "peer_blocks": PEER_BLOCKS, "query_norm": QUERY_NORMS}[field.name]}
            if field.name in ("ffn", "peer_blocks", "query_norm")
            else {}
        )
        kind = int if isinstance(getattr(d_model, field.name), int) else str
        train.add_argument(
            "--" + field.name.replace("_", "-"), type=kind, default=getattr(d_model, field.name), **kwargs
        )
    for field in dataclasses.fields(TrainConfig):
        if field.name in ("seed", "precision", "sparse"):
            continue
        value = getattr(d_train, field.name)
        train.add_argument("--" + field.name.replace("_", "-"), type=type(value), default=value)
    train.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="K",
        help="write <out>/checkpoint.{pt,npz} every K steps and at the end",
    )
    train.add_argument("--resume", action="store_true", help="continue from <out>'s checkpoint")
    train.add_argument(
        "--sparse",
        action="store_true",
        help="row-sparse expert-table gradients (SPEC 7.1) stepped by a lazy Adam (torch.optim.SparseAdam; "
        "JAX: optax.adam on the selected rows), every other parameter by AdamW; needs --ffn peer or peer_glu",
    )
    for name in (*EXPERIMENTS, "all"):
        experiment = sub.add_parser(
            name, parents=[common], help="every experiment" if name == "all" else f"the {name} experiment"
        )
        experiment.add_argument("--quick", action="store_true", help="the minute-scale size (each experiment < 2 min)")
    return p


def _check(args) -> None:
    if args.precision not in PRECISION_ALIASES:
        raise ConfigError(
            f"--precision {args.precision!r}, but expected one of float32 (fp32), bf16 (bfloat16) or fp16 (float16)"
        )
    given, args.precision = args.precision, PRECISION_ALIASES[args.precision]
    if args.precision == "float16" and args.backend == "jax" and args.command != "transfer":
        raise ConfigError(
            f"--precision {given} with --backend jax, but expected float32 or bf16: float16 training "
            "needs loss scaling, which this trainer offers for torch only (torch.amp.GradScaler)"
        )
    if args.threads < 1:
        raise ConfigError(f"--threads {args.threads}, but expected an int >= 1")
    if args.seed is not None and args.seed < 0:
        raise ConfigError(f"--seed {args.seed}, but expected an int >= 0")
    if args.command == "train" and args.checkpoint_every < 0:
        raise ConfigError(f"--checkpoint-every {args.checkpoint_every}, but expected an int >= 0")


def _threads(threads: int, device: str) -> None:
    """Thread counts and devices, set before any framework is imported."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
        os.environ[var] = str(threads)
    os.environ["TF_NUM_INTEROP_THREADS"] = "1"
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")
    if "jax" not in sys.modules:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=true"
            f" intra_op_parallelism_threads={threads}"
        ).strip()
    if device == "cpu" and "jax" not in sys.modules:
        os.environ["JAX_PLATFORMS"] = "cpu"


def _device_check(args) -> None:
    if args.device != "cuda":
        return
    if args.backend == "torch" or args.command == "transfer":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda, but torch sees no CUDA device (torch.cuda.is_available() is False)")
    if args.backend == "jax":
        import jax

        try:
            jax.devices("gpu")
        except RuntimeError:
            raise ConfigError("--device cuda, but JAX sees no GPU (install jax[cuda12])") from None


def environment(argv: list[str], threads: int) -> dict:
    from peer_bench.environment import collect

    env = collect(argv)
    env["command"] = " ".join(["python -m peer_train", *argv])
    env["threads"] = threads
    env["versions"] = {
        k: v
        for k, v in env["versions"].items()
        if k in ("numpy", "torch", "jax", "jaxlib", "flax", "optax", "tensorflow", "tensorflow-cpu", "keras")
    }
    try:
        from importlib.metadata import version

        env["versions"]["optax"] = version("optax")
    except Exception:  # optax is optional outside the jax extra
        pass
    return env


def _progress(disabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description:<28}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TextColumn("{task.fields[tps]:>7,.0f} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=disabled,
    )


def _train(args, corpus, progress) -> dict:
    from .train import run

    model_kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(ModelConfig) if f.name != "vocab"}
    train_kwargs = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name not in ("seed", "precision")
    }  # sparse included: --sparse
    model_cfg = ModelConfig(**model_kwargs)
    train_cfg = TrainConfig(**train_kwargs, seed=0 if args.seed is None else args.seed, precision=args.precision)
    return run(
        model_cfg,
        train_cfg,
        corpus,
        backend=args.backend,
        device=args.device,
        out_dir=Path(args.out),
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        progress=progress,
        label="train",
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    from peer_bench.extras import require

    needs = {"torch": ("torch",), "jax": ("jax", "flax", "optax")}
    frameworks = needs["torch"] + needs["jax"] if args.command in ("transfer", "all") else needs[args.backend]
    require("python -m peer_train", "train", ("rich", "matplotlib", *frameworks))
    from rich.console import Console

    from peer_ref.errors import PEERConfigError

    console = Console(stderr=True)
    try:
        _check(args)
        _threads(args.threads, args.device)
        _device_check(args)
        if args.out is None:
            args.out = str(Path("peer_train_out") / args.command)
        from . import data

        corpus = data.load(args.data)
    except (ConfigError, DataError, PEERConfigError) as err:
        console.print(f"[red]error:[/red] {err}", highlight=False)
        return 2
    if args.backend == "torch" or args.command in ("transfer", "all"):
        import torch

        torch.set_num_threads(args.threads)
        torch.use_deterministic_algorithms(True, warn_only=True)
    out = Path(args.out)
    size = "quick" if getattr(args, "quick", False) else "default"
    names = EXPERIMENTS if args.command == "all" else (args.command,)
    try:
        with _progress(args.no_progress) as progress:
            if args.command == "train":
                began, env = time.perf_counter(), environment(argv, args.threads)  # the code that runs
                record = _train(args, corpus, progress)
                record.update(environment=_finish(env, began), corpus=corpus.describe())
                from .report import write_json

                out.mkdir(parents=True, exist_ok=True)
                write_json(out / "train.json", record)
                console.print(_train_line(record), highlight=False)
                return 0
            for name in names:
                began, env = time.perf_counter(), environment(argv, args.threads)  # the code that runs
                result = _experiment(name, args, corpus, size, progress)
                result.update(environment=_finish(env, began), corpus=corpus.describe())
                from .report import write

                paths = write(out, name, result)
                console.print(f"{name}: wrote " + ", ".join(str(p) for p in paths), highlight=False)
    except (ConfigError, DataError, ResumeError, PEERConfigError) as err:
        console.print(f"[red]error:[/red] {err}", highlight=False)
        return 2
    return 0


def _finish(env: dict, began: float) -> dict:
    env["wall_s"] = time.perf_counter() - began
    env["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return env


def _train_line(record: dict) -> str:
    if "val_bpb" not in record:
        return f"stopped at step {record['completed_steps']}"
    routing = "; ".join(
        f"block {b}: usage {m['usage']:.1%}, unevenness {m['unevenness']:.3f}" for b, m in record["routing"].items()
    )
    return (
        f"val bpb {record['val_bpb']:.3f} after {record['completed_steps']} steps, "
        f"{record['tokens_per_s']:,.0f} tok/s" + (f"; {routing}" if routing else "")
    )


def _experiment(name: str, args, corpus, size: str, progress) -> dict:
    from . import experiments

    overrides = {"train": {"precision": args.precision}}
    if name == "isoflop":
        seeds = None if args.seed is None else (args.seed,)
        return experiments.isoflop(
            corpus, size, args.backend, args.device, seeds=seeds, overrides=overrides, progress=progress
        )
    if name == "pool":
        seeds = None if args.seed is None else (args.seed,)
        return experiments.pool(
            corpus, size, args.backend, args.device, seeds=seeds, overrides=overrides, progress=progress
        )
    seed = 0 if args.seed is None else args.seed
    if name == "usage":
        return experiments.usage(
            corpus, size, args.backend, args.device, seed=seed, overrides=overrides, progress=progress
        )
    return experiments.transfer(corpus, size, args.device, seed=seed, overrides=overrides, progress=progress)
