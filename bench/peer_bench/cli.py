"""`python -m peer_bench`: time every installed PEER backend against PEER-pytorch and a dense FFN."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path

from .presets import PRESETS, BenchCase, sweep_values

OUR_BACKENDS = ("numpy", "torch", "jax", "tensorflow")
ALL_BACKENDS = OUR_BACKENDS + ("peer_pytorch",)
CASE_FLAGS = {"d_model": int, "n_experts": int, "heads": int, "topk": int, "d_key": int, "tokens": int, "dtype": str}


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m peer_bench", description=__doc__)
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="cpu",
        help="cpu (default, about 5 min on 2 cores), paper (N=1024^2), gpu (training-sized: d_model=1024, "
        "N=1024^2, 32768 tokens; for one GPU), smoke (seconds)",
    )
    for field, kind in CASE_FLAGS.items():
        p.add_argument("--" + field.replace("_", "-"), type=kind, help=f"override the preset's {field}")
    p.add_argument(
        "--backends",
        default=",".join(ALL_BACKENDS),
        help=f"comma-separated subset of {','.join(ALL_BACKENDS)} (default: all); BACKEND:IMPLEMENTATION "
        "forces one implementation of the expert stage, e.g. torch:aten,torch:triton,jax:pallas "
        "(a plain name runs the backend's default: implementation=None)",
    )
    p.add_argument("--repeats", type=int, help="timed calls per measurement (at most; see --budget-s)")
    p.add_argument("--warmup", type=int, help="untimed calls before timing (compilation happens there)")
    p.add_argument("--budget-s", type=float, help="stop timing a measurement early after this many seconds")
    p.add_argument(
        "--paths",
        default="eager,compiled",
        help="comma-separated subset of eager,compiled (compiled needs the 'jit' capability)",
    )
    p.add_argument(
        "--sweep",
        default="reduced",
        choices=["reduced", "experts", "tokens", "all", "none"],
        help="reduced (default: the preset's few points), experts, tokens, all (full sweeps), none",
    )
    p.add_argument(
        "--glu",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time PEER-GLU (GLU experts, expert_glu=True) on the first of --paths, "
        "next to the plain rows; with --devices, also measure it sharded "
        "(default: on; --no-glu leaves it out)",
    )
    p.add_argument(
        "--mixed",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the mixed mode (float32 parameters, bfloat16 x/y, compute_dtype='bfloat16', "
        "SPEC §10.3) on the first of --paths, and PEER-pytorch cast to bfloat16 "
        "(default: on; --no-mixed leaves them out)",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument(
        "--devices",
        type=int,
        help="instead of timing: per-device memory and communicated bytes per token of the expert "
        "tables sharded over this many devices (torch and jax of --backends; simulated on cpu)",
    )
    p.add_argument(
        "--train-step",
        action="store_true",
        help="instead of the forward/backward matrix: time whole training steps (forward, backward, "
        "optimizer step) and their peak memory over the experts of --sweep: the torch layer with dense "
        "gradients + AdamW and with sparse gradients + SparseAdam, PEER-pytorch + AdamW, the dense FFN + "
        "AdamW, and the jax layer with optax (those of --backends); writes train_step.json and train_step.md",
    )
    p.add_argument("--threads", type=int, default=_default_threads(), help="threads for every framework")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/out"), help="output folder (default bench/out)")
    return p


def _fail(p, arg, value, expected):
    p.error(f"{arg}={value!r}, but expected {expected}")


def settings_from_args(args, p):
    from peer_ref.config import PEERConfig
    from peer_ref.errors import PEERConfigError

    from .runner import Settings

    preset = PRESETS[args.preset]
    overrides = {f: getattr(args, f) for f in CASE_FLAGS if getattr(args, f) is not None}
    case = dataclasses.replace(preset.case, **overrides)
    try:
        PEERConfig(**case.config())
    except PEERConfigError as err:
        p.error(str(err))
    if case.dtype not in ("float32", "float64", "bfloat16"):
        _fail(p, "--dtype", case.dtype, "one of float32, float64, bfloat16")
    if case.tokens < 1:
        _fail(p, "--tokens", case.tokens, "an int >= 1")
    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    for name in backends:
        base, _, implementation = name.partition(":")
        if base not in ALL_BACKENDS or (implementation and base not in OUR_BACKENDS) or name.endswith(":"):
            _fail(
                p,
                "--backends",
                name,
                f"names from {','.join(ALL_BACKENDS)}, or BACKEND:IMPLEMENTATION "
                "(e.g. torch:triton, jax:pallas) for one implementation of the expert stage",
            )
    paths = tuple(x.strip() for x in args.paths.split(",") if x.strip())
    if not paths or any(x not in ("eager", "compiled") for x in paths):
        _fail(p, "--paths", args.paths, "a comma-separated subset of eager,compiled")
    if args.repeats is not None and args.repeats < 1:
        _fail(p, "--repeats", args.repeats, "an int >= 1")
    timing, train_timing = (_timing(preset.timing, args), _timing(preset.train_timing, args))
    if args.threads < 1:
        _fail(p, "--threads", args.threads, "an int >= 1")
    axes = _valid_sweep(sweep_values(preset, args.sweep), case)
    return Settings(
        preset=args.preset,
        case=case,
        timing=timing,
        device=args.device,
        threads=args.threads,
        backends=backends,
        paths=paths,
        sweep=args.sweep,
        sweep_axes=axes,
        sweep_timing=preset.sweep_timing,
        job_timeout_s=preset.job_timeout_s,
        bandwidth_bytes=preset.bandwidth_bytes,
        seed=args.seed,
        glu=args.glu,
        mixed=args.mixed,
        train_timing=train_timing,
    )


def _timing(timing, args):
    """`timing` with --repeats, --warmup and --budget-s applied."""
    if args.repeats is not None:
        timing = dataclasses.replace(timing, repeats=args.repeats, min_repeats=min(timing.min_repeats, args.repeats))
    if args.warmup is not None:
        timing = dataclasses.replace(timing, warmup=max(1, args.warmup))
    if args.budget_s is not None:
        timing = dataclasses.replace(timing, budget_s=args.budget_s)
    return timing


def _valid_sweep(axes, case: BenchCase):
    # N values whose n_keys is below topk cannot hold the layer; drop them rather than fail.
    if "experts" in axes:
        axes["experts"] = tuple(n for n in axes["experts"] if math.isqrt(n) >= case.topk)
    return {axis: values for axis, values in axes.items() if values}


def build_report(runner, argv, load_before) -> dict:
    from . import formulas, peer_pytorch, report
    from .environment import collect
    from .runner import thread_settings

    s = runner.settings
    copy_bw = (runner.bandwidth or {}).get("bytes_per_s")
    sweeps = runner.sweep_rows
    report.add_derived(runner.rows, copy_bw)
    report.add_derived(sweeps, copy_bw, reference_rows=sweeps)
    return {
        "schema": report.SCHEMA,
        "settings": {
            "preset": s.preset,
            "device": s.device,
            "threads": s.threads,
            "backends": list(s.backends),
            "paths": list(s.paths),
            "timing": dataclasses.asdict(s.timing),
            "sweep_timing": dataclasses.asdict(s.sweep_timing),
            "sweep": s.sweep,
            "sweep_axes": {k: list(v) for k, v in s.sweep_axes.items()},
            "seed": s.seed,
            "glu": s.glu,
            "mixed": s.mixed,
        },
        "case": s.case.to_dict(),
        "counts": formulas.case_counts(s.case),
        "formulas": {
            "flops": formulas.__doc__,
            "memory": "see peer_bench.worker.measure and peer_bench.memory",
            "expert_bandwidth": "expert_stage_bytes / full-layer forward median time; "
            "expert_stage_bytes = T*h*k*(d_model+d_out)*itemsize + T*(d_model+d_out)*itemsize"
            " (GLU experts: T*h*k*(2*d_model+d_out)*itemsize for the rows)",
        },
        "peer_pytorch_mapping": {
            "arguments": peer_pytorch.mapping(s.case),
            "differences": list(peer_pytorch.DIFFERENCES),
        },
        "bandwidth": runner.bandwidth,
        "environment": collect(argv)
        | {
            "threads": thread_settings(s.threads),
            "frameworks": runner.frameworks,
            "load_average_before": load_before,
            "load_average_after": _load(),
        },
        "jobs": runner.job_walls,
        "results": runner.rows,
        "sweeps": sweeps,
    }


def _load() -> list[float] | None:
    """1/5/15-minute load averages: above the thread count, other processes shared the cores."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _sharded(args, p, settings) -> int:
    from . import sharded

    if args.devices < 2:
        _fail(p, "--devices", args.devices, "an int >= 2")
    backends = [b for b in settings.backends if b in ("torch", "jax")]
    if not backends:
        _fail(p, "--backends", args.backends, "torch and/or jax with --devices")
    results = sharded.run(settings.case, args.devices, backends, settings.device, args.out, glu=settings.glu)
    print("\n".join(sharded.table(results)))
    print(f"wrote {args.out / 'sharded.json'}")
    return 0


def _train_step(args, settings, argv) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from . import peer_pytorch, train_step
    from .environment import collect
    from .runner import thread_settings

    console = Console() if Console().is_terminal else Console(width=200)
    c = settings.case
    console.print(
        f"[bold]PEER bench: training steps[/] preset={settings.preset} device={settings.device} "
        f"threads={settings.threads} d_model={c.d_model} heads={c.heads} topk={c.topk} d_key={c.d_key} "
        f"tokens={c.tokens} {c.dtype}"
    )
    load_before = _load()
    columns = (TextColumn("{task.description:<52}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        rows, walls, frameworks = train_step.run(settings, progress)
    train_step.add_ratios(rows)
    result = {
        "schema": train_step.SCHEMA,
        "settings": {
            "preset": settings.preset,
            "device": settings.device,
            "threads": settings.threads,
            "backends": list(settings.backends),
            "train_timing": dataclasses.asdict(settings.train_timing),
            "sweep": settings.sweep,
            "n_experts": sorted({r["case"]["n_experts"] for r in rows}),
            "seed": settings.seed,
        },
        "case": c.to_dict(),
        "step": train_step.__doc__,
        "peer_pytorch_mapping": {
            "arguments": peer_pytorch.mapping(c),
            "differences": list(peer_pytorch.DIFFERENCES),
        },
        "environment": collect(argv)
        | {
            "threads": thread_settings(settings.threads),
            "frameworks": frameworks,
            "load_average_before": load_before,
            "load_average_after": _load(),
        },
        "jobs": walls,
        "rows": rows,
        "targets": train_step.targets(rows),
    }
    paths = train_step.write(result, args.out)
    console.print(train_step.markdown(result))
    return _finish(console, result, settings, paths)


def _finish(console, result: dict, settings, paths: dict) -> int:
    """The closing lines of a run: a warning where other processes shared the cores, the files written."""
    load = result["environment"]["load_average_after"]
    if load and load[0] > settings.threads:
        console.print(
            f"[yellow]note:[/] load average {load[0]} > {settings.threads} threads: other processes "
            "shared the cores, so times are inflated and noisy"
        )
    console.print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = parser()
    args = p.parse_args(argv)
    settings = settings_from_args(args, p)
    if args.devices is not None:
        return _sharded(args, p, settings)
    from .extras import require

    require("python -m peer_bench", "bench", ("rich", "matplotlib"))
    if args.train_step:
        return _train_step(args, settings, argv)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from . import peer_pytorch, plots, report
    from .runner import Runner

    console = Console()
    if not console.is_terminal:  # logs and pipes: keep table rows on one line
        console = Console(width=200)
    c = settings.case
    console.print(
        f"[bold]PEER bench[/] preset={settings.preset} device={settings.device} threads={settings.threads} "
        f"d_model={c.d_model} N={c.n_experts} heads={c.heads} topk={c.topk} d_key={c.d_key} "
        f"tokens={c.tokens} {c.dtype}"
    )
    console.print(f"PEER-pytorch mapped as PEER({peer_pytorch.mapping(c)})")
    columns = (TextColumn("{task.description:<42}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    runner = Runner(settings)
    load_before = _load()
    with Progress(*columns, console=console, transient=False) as progress:
        runner.progress = progress
        runner.run()
    result = build_report(runner, argv, load_before)
    bw = result["bandwidth"]
    title = (
        f"N={c.n_experts}, {c.tokens} tokens, {c.dtype}, {settings.threads} threads; copy bandwidth "
        f"{bw.get('bytes_per_s', float('nan')) / 1e9:.1f} GB/s; dense width {result['counts']['dense_width']}"
    )
    console.print(report.terminal_table(result["results"], title))
    paths = report.write(result, args.out)
    paths |= plots.write_all(result, args.out)
    for name in ("experts", "tokens"):
        table = report.sweep_table(result["sweeps"], name)
        if table:
            console.print(
                f"forward median ms over {name}: "
                + "; ".join(
                    f"{line[0]}: " + ", ".join(f"{h}={v}" for h, v in zip(table[0][1:], line[1:])) for line in table[1]
                )
            )
    return _finish(console, result, settings, paths)
