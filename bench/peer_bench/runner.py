"""Plans the jobs and runs each in its own worker process, with a progress display.

One process per (implementation, path, mode) keeps frameworks from fighting over threads and
memory, and gives each memory measurement its own high-water mark. Thread counts and device
visibility go into the child's environment, so they hold before the framework is imported.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time

from peer_backends import BACKENDS

from .presets import BenchCase, Timing, sweep_cases
from .worker import RESULT_MARK

PEER_PYTORCH = "peer_pytorch"
# The reduced (default) sweep leaves out the NumPy reference: it is the oracle, not a performance
# target, and its sweep alone would take a tenth of the default run's budget.
REDUCED_SWEEP_SKIPS = ("numpy",)
CELLS = (("eager", "forward"), ("eager", "forward_backward"), ("compiled", "forward"), ("compiled", "forward_backward"))


@dataclasses.dataclass
class Settings:
    preset: str
    case: BenchCase
    timing: Timing
    device: str  # "cpu" | "gpu"
    threads: int
    backends: tuple[str, ...]  # our backends, and PEER_PYTORCH for the outside baseline
    paths: tuple[str, ...]  # of "eager", "compiled"
    sweep: str
    sweep_axes: dict[str, tuple[int, ...]]
    sweep_timing: Timing
    job_timeout_s: float
    bandwidth_bytes: int
    seed: int = 0
    glu: bool = True  # also time PEER-GLU (expert_glu=True) on the first path, both modes
    # Also time the mixed mode (float32 parameters, compute_dtype=MIXED_DTYPE, SPEC §10.3) on the
    # first path, both modes, and PEER-pytorch with its module in MIXED_DTYPE.
    mixed: bool = True
    # --train-step: the timing of each training-step row (Preset.train_timing).
    train_timing: Timing = dataclasses.field(default_factory=Timing)


MIXED_DTYPE = "bfloat16"


def child_env(threads: int, device: str) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
        env[var] = str(threads)
    env["TF_NUM_INTEROP_THREADS"] = "1"
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={threads}"
    ).strip()
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["JAX_PLATFORMS"] = "cpu"
    return env


def thread_settings(threads: int) -> dict[str, str]:
    """The thread-related variables every worker gets (for the report)."""
    env = child_env(threads, "cpu")
    keys = (
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "TF_NUM_INTRAOP_THREADS",
        "TF_NUM_INTEROP_THREADS",
        "XLA_FLAGS",
    )
    return {k: env[k] for k in keys} | {
        "torch.set_num_threads": str(threads),
        "tf.config.threading.set_intra_op_parallelism_threads": str(threads),
    }


def run_worker(job: dict, settings: Settings) -> dict:
    """Run one job in a fresh process; failures come back as {"error": ...}."""
    cmd = [sys.executable, "-m", "peer_bench.worker", "--json", json.dumps(job)]
    try:
        proc = subprocess.run(
            cmd,
            env=child_env(settings.threads, settings.device),
            capture_output=True,
            text=True,
            timeout=settings.job_timeout_s,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"worker timed out after {settings.job_timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
    return {"error": f"worker exited with code {proc.returncode} and no result: {tail}"}


def _unavailable(name: str) -> str | None:
    """Why backend `name` (or BACKEND:IMPLEMENTATION) cannot run here, found without importing any framework."""
    entry = BACKENDS.get(name.partition(":")[0])
    if name == PEER_PYTORCH:
        if importlib.util.find_spec("PEER_pytorch") is None:
            return "PEER-pytorch is not installed (pip install 'peer-layer[bench]')"
        return None
    if entry is None:
        return f"unknown backend {name!r}"
    if importlib.util.find_spec(entry.framework) is None:
        return f"framework {entry.framework!r} is not installed"
    if importlib.util.find_spec(entry.module) is None:
        return f"{entry.module} does not exist yet"
    return None


class Runner:
    """Runs the matrix, then the sweeps; collects rows and what the workers reported."""

    def __init__(self, settings: Settings, progress=None):
        self.settings = settings
        self.progress = progress
        self.task = None
        self.rows: list[dict] = []
        self.sweep_rows: list[dict] = []
        self.frameworks: dict[str, dict] = {}  # per backend: framework info, version, capabilities
        self.bandwidth: dict | None = None
        self.job_walls: list[dict] = []  # wall time of every worker process, import and compile included
        self.blocked: dict[str, str] = {}  # backend -> why none of its jobs can run here

    def _job(self, kind, impl, backend, path, mode, cases, **extra) -> dict:
        s = self.settings
        framework = "torch" if impl == PEER_PYTORCH else BACKENDS[backend.partition(":")[0]].framework
        timing = s.sweep_timing if kind == "sweep" else s.timing
        return {
            "kind": kind,
            "impl": impl,
            "backend": backend,
            "framework": framework,
            "path": path,
            "mode": mode,
            "cases": [c.to_dict() for c in cases],
            "device": s.device,
            "threads": s.threads,
            "timing": dataclasses.asdict(timing),
            "seed": s.seed,
            **extra,
        }

    def _run(self, job) -> dict:
        started = time.perf_counter()
        result = run_worker(job, self.settings)
        wall = time.perf_counter() - started
        self.job_walls.append(
            {
                "kind": job["kind"],
                "impl": job.get("impl"),
                "backend": job.get("backend"),
                "path": job.get("path"),
                "mode": job.get("mode"),
                "wall_s": wall,
            }
        )
        for row in result.get("rows", []):
            row["job_wall_s"] = wall
        return result

    def _show(self, label: str):
        if self.progress is not None:
            self.progress.update(self.task, description=label)

    def _advance(self):
        if self.progress is not None:
            self.progress.update(self.task, advance=1)

    def _skip(self, impl, backend, path, mode, reason):
        self.rows.append(
            {
                "impl": impl,
                "backend": backend,
                "path": path,
                "mode": mode,
                "case": self.settings.case.to_dict(),
                "status": "skipped",
                "reason": reason,
            }
        )

    def total_jobs(self) -> int:
        ours = [b for b in self.settings.backends if b != PEER_PYTORCH]
        baseline = PEER_PYTORCH in self.settings.backends
        sweeps = (len(ours) + baseline) if self.settings.sweep_axes else 0
        paths = len(self.settings.paths)
        glu = 2 * len(ours) if self.settings.glu else 0
        mixed = 2 * len(ours) if self.settings.mixed else 0
        baseline_cells = 2 * baseline * ("eager" in self.settings.paths) * (1 + self.settings.mixed)
        return 1 + 2 * paths * len(ours) + glu + mixed + baseline_cells + sweeps

    def run(self):
        if self.progress is not None:
            self.task = self.progress.add_task("copy bandwidth", total=self.total_jobs())
        self._bandwidth()
        for name in self.settings.backends:
            if name != PEER_PYTORCH:
                self._backend_cells(name)
        if self.settings.glu:
            for name in self.settings.backends:
                if name != PEER_PYTORCH:
                    self._glu_cells(name)
        if self.settings.mixed:
            for name in self.settings.backends:
                if name != PEER_PYTORCH:
                    self._mixed_cells(name)
        if PEER_PYTORCH in self.settings.backends:
            self._baseline_cells(self.settings.case)
            if self.settings.mixed:
                # PEER-pytorch has no mixed mode of its own: its module is cast with .to(MIXED_DTYPE).
                self._baseline_cells(dataclasses.replace(self.settings.case, dtype=MIXED_DTYPE))
        for name in self.settings.backends:
            self._sweep(name)

    def _bandwidth(self):
        job = {"kind": "bandwidth", "device": self.settings.device, "bandwidth_bytes": self.settings.bandwidth_bytes}
        result = self._run(job)
        self.bandwidth = result.get("bandwidth") or {"error": result.get("error", "no result")}
        self._advance()

    def _record(self, name, result, impl, path, mode, case=None) -> str | None:
        """Store a worker's rows; returns the reason when no job of this backend can run here."""
        if "framework" in result:
            info = self.frameworks.setdefault(name, {})
            info.update({k: result[k] for k in ("framework", "backend_version", "capabilities") if k in result})
        if "rows" in result:
            self.rows.extend(result["rows"])
            return None
        status = "skipped" if "skipped" in result else "error"
        self.rows.append(
            {
                "impl": impl,
                "backend": name,
                "path": path,
                "mode": mode,
                "case": (case or self.settings.case).to_dict(),
                "status": status,
                "reason": result[status],
            }
        )
        return result["skipped"] if result.get("blocks_backend") else None

    def _backend_cells(self, name):
        blocked = _unavailable(name)
        for path, mode in CELLS:
            if path not in self.settings.paths:
                continue
            self._show(f"PEER {name} {path} {mode}")
            caps = self.frameworks.get(name, {}).get("capabilities")
            if blocked is None and path == "compiled" and caps is not None and "jit" not in caps:
                self._skip("peer", name, path, mode, f"backend {name!r} lacks the 'jit' capability")
            elif blocked is not None:
                self._skip("peer", name, path, mode, blocked)
            else:
                job = self._job("cell", "peer", name, path, mode, [self.settings.case], dense=True)
                blocked = self._record(name, self._run(job), "peer", path, mode)
            self._advance()
        if blocked is not None:
            self.blocked[name] = blocked

    def _glu_cells(self, name):
        """PEER-GLU: the same case with GLU experts, on the first path only and without a dense
        twin; report.add_derived sets its time ratio to the plain PEER row of the same cell."""
        self._variant_cells(name, dataclasses.replace(self.settings.case, expert_glu=True), "PEER-GLU")

    def _mixed_cells(self, name):
        """PEER mixed: the same case with float32 parameters and compute_dtype=MIXED_DTYPE (SPEC §10.3),
        on the first path only, without a dense twin; report.add_derived sets its time ratio to
        the float32 PEER row of the same cell and to PEER-pytorch in MIXED_DTYPE."""
        case = dataclasses.replace(self.settings.case, dtype="float32", compute_dtype=MIXED_DTYPE)
        self._variant_cells(name, case, f"PEER mixed-{MIXED_DTYPE}")

    def _variant_cells(self, name, case, title):
        path = self.settings.paths[0]
        blocked = self.blocked.get(name) or _unavailable(name)
        for mode in ("forward", "forward_backward"):
            self._show(f"{title} {name} {path} {mode}")
            caps = self.frameworks.get(name, {}).get("capabilities")
            if blocked is None and path == "compiled" and caps is not None and "jit" not in caps:
                reason = f"backend {name!r} lacks the 'jit' capability"
            else:
                reason = blocked
            if reason is not None:
                self.rows.append(
                    {
                        "impl": "peer",
                        "backend": name,
                        "path": path,
                        "mode": mode,
                        "case": case.to_dict(),
                        "status": "skipped",
                        "reason": reason,
                    }
                )
            else:
                job = self._job("cell", "peer", name, path, mode, [case])
                blocked = self._record(name, self._run(job), "peer", path, mode, case)
            self._advance()

    def _baseline_cells(self, case):
        if "eager" not in self.settings.paths:
            return
        blocked = self.blocked.get(PEER_PYTORCH) or _unavailable(PEER_PYTORCH)
        for path, mode in CELLS[:2]:  # PEER-pytorch runs as its users run it: eager
            self._show(f"PEER-pytorch {case.dtype} {path} {mode}")
            if blocked is not None:
                self.rows.append(
                    {
                        "impl": PEER_PYTORCH,
                        "backend": "torch",
                        "path": path,
                        "mode": mode,
                        "case": case.to_dict(),
                        "status": "skipped",
                        "reason": blocked,
                    }
                )
            else:
                job = self._job("cell", PEER_PYTORCH, "torch", path, mode, [case])
                blocked = self._record(PEER_PYTORCH, self._run(job), PEER_PYTORCH, path, mode, case)
            self._advance()
        if blocked is not None:
            self.blocked[PEER_PYTORCH] = blocked

    def _sweep(self, name):
        """Forward over the sweep cases on the backend's default path (jit=None): what a user
        gets without asking, and no torch.compile per shape."""
        if not self.settings.sweep_axes:
            return
        if self.settings.sweep == "reduced" and name in REDUCED_SWEEP_SKIPS:
            self._advance()
            return
        impl = PEER_PYTORCH if name == PEER_PYTORCH else "peer"
        backend = "torch" if impl == PEER_PYTORCH else name
        ran = any(r["impl"] == impl and r["backend"] == backend and r["status"] == "ok" for r in self.rows)
        if ran:
            self._show(f"{name} sweep")
            path = "eager" if impl == PEER_PYTORCH else "default"
            pairs = sweep_cases(self.settings.case, self.settings.sweep_axes)
            job = self._job(
                "sweep", impl, backend, path, "forward", [c for c, _ in pairs], axes=[axes for _, axes in pairs]
            )
            result = self._run(job)
            self.sweep_rows.extend(result.get("rows", []))
            if "rows" not in result:
                self.sweep_rows.append(
                    {
                        "impl": impl,
                        "backend": backend,
                        "path": path,
                        "mode": "forward",
                        "status": "error",
                        "axes": [],
                        "reason": result.get("skipped") or result.get("error"),
                    }
                )
        self._advance()
