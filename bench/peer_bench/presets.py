"""Benchmark cases, presets and sweeps. Plain data: importing this module does nothing else."""

from __future__ import annotations

import dataclasses
from typing import Any

CASE_FIELDS = ("d_model", "n_experts", "heads", "topk", "d_key", "tokens", "dtype", "expert_glu", "compute_dtype")
DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
SWEEP_AXES = {"experts": "n_experts", "tokens": "tokens"}


@dataclasses.dataclass(frozen=True)
class BenchCase:
    """One layer shape to time. Every other PEERConfig field keeps its default (the paper's layer:
    shared keys, query batch norm, GELU experts with a bias, softmax scores); ``expert_glu`` turns
    the experts into GEGLU experts (SPEC §3.10). ``compute_dtype`` ("bfloat16" or "float16", with
    dtype "float32") times the mixed mode of SPEC §10.3: float32 parameters, x and y in compute_dtype."""

    d_model: int
    n_experts: int
    heads: int
    topk: int
    d_key: int
    tokens: int
    dtype: str = "float32"
    expert_glu: bool = False
    compute_dtype: str | None = None

    @property
    def activation_dtype(self) -> str:
        """The dtype of x, dy and y: compute_dtype in the mixed mode, else the parameters' dtype."""
        return self.compute_dtype or self.dtype

    def config(self) -> dict[str, Any]:
        """The PEERConfig fields of this case."""
        return {k: getattr(self, k) for k in ("d_model", "n_experts", "heads", "topk", "d_key", "expert_glu")}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchCase:
        # Results written before a field existed lack it: it takes its default.
        return cls(**{k: data[k] for k in CASE_FIELDS if k in data})


@dataclasses.dataclass(frozen=True)
class Timing:
    """How long each measurement runs: `warmup` untimed calls (compilation happens there), then
    timed calls until `repeats` are done, or earlier once at least `min_repeats` are done and the
    timed calls have used `budget_s` seconds."""

    warmup: int = 1
    repeats: int = 5
    min_repeats: int = 3
    budget_s: float = 3.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Preset:
    case: BenchCase
    timing: Timing
    # Values of each sweep axis: "full" for --sweep experts|tokens, "reduced" for the default run.
    # Sweeps time the forward pass only, with their own (shorter) timing.
    sweep_full: dict[str, tuple[int, ...]]
    sweep_reduced: dict[str, tuple[int, ...]]
    sweep_timing: Timing
    job_timeout_s: float = 600.0
    bandwidth_bytes: int = 256 * 2**20  # per array: far beyond the last-level cache
    # --train-step: warm-up steps (the first allocates the optimizer state), then timed steps.
    train_timing: Timing = Timing(warmup=2, repeats=6, min_repeats=4, budget_s=3.0)


_FULL = {"experts": (128**2, 256**2, 512**2, 1024**2), "tokens": (256, 512, 1024, 2048, 4096, 8192)}
_CPU_CASE = BenchCase(d_model=256, n_experts=256**2, heads=8, topk=16, d_key=128, tokens=2048)

PRESETS: dict[str, Preset] = {
    # Sized so that the whole default run (matrix and reduced sweeps, every backend) takes about
    # five minutes on a 2-core machine (5 min 12 s on 2026-11-29); the slow NumPy reference is what bounds the repeats.
    "cpu": Preset(
        case=_CPU_CASE,
        timing=Timing(warmup=1, repeats=5, min_repeats=3, budget_s=1.5),
        sweep_full=_FULL,
        sweep_reduced={"experts": (128**2, 512**2), "tokens": (512, 1024)},
        sweep_timing=Timing(warmup=1, repeats=2, min_repeats=2, budget_s=0.0),
    ),
    "paper": Preset(
        case=dataclasses.replace(_CPU_CASE, n_experts=1024**2),
        timing=Timing(warmup=1, repeats=5, min_repeats=3, budget_s=5.0),
        sweep_full=_FULL,
        sweep_reduced={"experts": (256**2,), "tokens": (512,)},
        sweep_timing=Timing(warmup=1, repeats=3, min_repeats=2, budget_s=2.0),
        job_timeout_s=1800.0,
    ),
    # Training-sized, for one GPU: the paper's expert
    # count with a 1024-wide model and 32768 tokens per call, so that launch latency is small
    # next to the work. The token sweep shows where each implementation saturates.
    "gpu": Preset(
        case=BenchCase(d_model=1024, n_experts=1024**2, heads=8, topk=16, d_key=128, tokens=32768),
        timing=Timing(warmup=2, repeats=10, min_repeats=5, budget_s=2.0),
        sweep_full={"experts": (256**2, 512**2, 1024**2), "tokens": (2048, 4096, 8192, 16384, 32768, 65536)},
        sweep_reduced={"tokens": (2048, 8192, 32768, 65536)},
        sweep_timing=Timing(warmup=2, repeats=5, min_repeats=3, budget_s=0.5),
        job_timeout_s=300.0,
        bandwidth_bytes=1024 * 2**20,
    ),
    "smoke": Preset(
        case=BenchCase(d_model=16, n_experts=8**2, heads=2, topk=4, d_key=8, tokens=32),
        timing=Timing(warmup=1, repeats=3, min_repeats=2, budget_s=0.2),
        sweep_full={"experts": (4**2, 8**2, 16**2), "tokens": (8, 32, 128)},
        sweep_reduced={"experts": (16**2,), "tokens": (128,)},
        sweep_timing=Timing(warmup=1, repeats=2, min_repeats=1, budget_s=0.1),
        job_timeout_s=120.0,
        bandwidth_bytes=64 * 2**20,
        train_timing=Timing(warmup=1, repeats=2, min_repeats=1, budget_s=0.1),
    ),
}


def sweep_values(preset: Preset, sweep: str) -> dict[str, tuple[int, ...]]:
    """Axis -> values for --sweep (reduced | experts | tokens | all | none)."""
    if sweep == "none":
        return {}
    if sweep == "reduced":
        return dict(preset.sweep_reduced)
    if sweep == "all":
        return dict(preset.sweep_full)
    if sweep in SWEEP_AXES:
        return {sweep: preset.sweep_full[sweep]}
    raise ValueError(f"sweep={sweep!r}, but expected one of ['reduced', 'experts', 'tokens', 'all', 'none']")


def sweep_cases(case: BenchCase, axes: dict[str, tuple[int, ...]]) -> list[tuple[BenchCase, list[str]]]:
    """Each distinct case of the sweeps, with the axes it lies on (the base case lies on all)."""
    found: dict[BenchCase, list[str]] = {}
    for axis, values in axes.items():
        for value in sorted(set(values) | {getattr(case, SWEEP_AXES[axis])}):
            found.setdefault(dataclasses.replace(case, **{SWEEP_AXES[axis]: value}), []).append(axis)
    return list(found.items())
