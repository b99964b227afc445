"""One benchmark job in its own process: `python -m peer_bench.worker --json JOB`.

The parent sets thread counts and device visibility in this process's environment before any
framework is imported; the result is one line on stdout, prefixed with RESULT_MARK (frameworks
print their own lines too). Job kinds: "cell" (one implementation, path and mode on one case,
plus the equal-FLOP dense FFN of the same framework), "sweep" (forward over several cases, on
the backend's default path: jit=None), "train_step" (whole training steps: peer_bench.train_step),
and "bandwidth" (the machine's copy bandwidth).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback

import numpy as np

from .formulas import case_counts, dense_width, mode_factor, peer_flops_per_token
from .memory import cpu_meter
from .presets import BenchCase, Timing

RESULT_MARK = "PEER_BENCH_RESULT "


def measure(call, fw, mode, timing: Timing, meter) -> dict:
    """Warm up, then time `call` (see Timing); memory is counted from just before the first call.

    peak_mem_bytes covers warm-up (compilation included) and timed calls; peak_mem_steady_bytes
    only the timed calls, and is None where the high-water mark cannot be reset."""
    gc.collect()
    base = meter.reset()
    with fw.call_context(mode):
        start = time.perf_counter()
        fw.block(call())
        first_call_s = time.perf_counter() - start
        for _ in range(timing.warmup - 1):
            fw.block(call())
        warm_peak = meter.peak()
        if meter.resets:
            meter.reset()
        times = []
        while len(times) < timing.repeats:
            start = time.perf_counter()
            fw.block(call())
            times.append(time.perf_counter() - start)
            if len(times) >= timing.min_repeats and sum(times) >= timing.budget_s:
                break
        timed_peak = meter.peak()
    q1, median, q3 = np.percentile(times, [25, 50, 75])
    return {
        "times_s": times,
        "median_s": float(median),
        "q1_s": float(q1),
        "q3_s": float(q3),
        "min_s": min(times),
        "max_s": max(times),
        "repeats": len(times),
        "first_call_s": first_call_s,
        "peak_mem_bytes": max(warm_peak, timed_peak) - base,
        # Below zero means the timed calls stayed under the pre-call level (warm-up freed memory).
        "peak_mem_steady_bytes": max(0, timed_peak - base) if meter.resets else None,
        "mem_method": meter.method,
    }


def _inputs(case: BenchCase, seed: int):
    rng = np.random.default_rng(seed)
    dtype = _numpy_dtype(case.activation_dtype)
    x = rng.standard_normal((case.tokens, case.d_model), dtype=np.float32).astype(dtype)
    dy = rng.standard_normal((case.tokens, case.d_model), dtype=np.float32).astype(dtype)
    return x, dy


def _numpy_dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def _dense_params(case: BenchCase, seed: int) -> dict:
    width = dense_width(peer_flops_per_token(**case.config())["total"], case.d_model)
    rng = np.random.default_rng(seed + 1)
    dtype = _numpy_dtype(case.dtype)

    def draw(shape, fan_in):
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(dtype)

    return {
        "w1": draw((case.d_model, width), case.d_model),
        "b1": np.zeros(width, dtype),
        "w2": draw((width, case.d_model), width),
        "b2": np.zeros(case.d_model, dtype),
    }


def _peer_call(job, case, fw, backend, x, dy, mode):
    if job["impl"] == "peer_pytorch":
        from . import peer_pytorch

        return peer_pytorch.build(case, fw, job["seed"], x, dy, mode)
    from peer_ref.config import PEERConfig

    cfg = PEERConfig(**case.config())
    params, state = backend.init(cfg, seed=job["seed"], dtype=case.dtype)
    params, state = fw.to_device(params), fw.to_device(state)
    jit = {"eager": False, "compiled": True, "default": None}[job["path"]]
    extra = {} if case.compute_dtype is None else {"compute_dtype": case.compute_dtype}
    implementation = job["backend"].partition(":")[2]
    if implementation:  # BACKEND:IMPLEMENTATION forces one; a plain name runs the backend's default
        extra["implementation"] = implementation
    if mode == "forward":
        return lambda: backend.apply(cfg, params, state, x, training=False, jit=jit, **extra)
    return lambda: backend.vjp(cfg, params, state, x, dy, training=True, jit=jit, **extra)


def _row(job, case, impl, mode, **fields) -> dict:
    return {
        "impl": impl,
        "backend": job["backend"],
        "path": job["path"],
        "mode": mode,
        "case": case.to_dict(),
        **fields,
    }


def _timed_row(job, case, impl, mode, build, fw, meter) -> dict:
    """Build the inputs and callable, time it; an exception becomes an "error" row."""
    timing = Timing(**job["timing"])
    try:
        x_np, dy_np = _inputs(case, job["seed"])
        x, dy = fw.put(x_np), fw.put(dy_np)
        call = build(x, dy)
        stats = measure(call, fw, mode, timing, meter)
    except Exception as err:  # a backend bug must not stop the other measurements
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        return _row(job, case, impl, mode, status="error", reason=reason, traceback=traceback.format_exc(limit=6))
    counts = case_counts(case)
    flops = counts["dense_flops_forward" if impl == "dense" else "peer_flops_forward"] * mode_factor(mode)
    fields = {
        "status": "ok",
        **stats,
        "flops": flops,
        "tokens_per_s": case.tokens / stats["median_s"],
        "gflops_per_s": flops / stats["median_s"] / 1e9,
    }
    if impl == "dense":
        fields["dense_width"] = counts["dense_width"]
    return _row(job, case, impl, mode, **fields)


def run_cell(job, fw, backend, meter) -> list[dict]:
    case = BenchCase.from_dict(job["cases"][0])
    mode = job["mode"]
    rows = [
        _timed_row(
            job, case, job["impl"], mode, lambda x, dy: _peer_call(job, case, fw, backend, x, dy, mode), fw, meter
        )
    ]
    if job.get("dense"):
        params = fw.to_device({k: fw.put(v) for k, v in _dense_params(case, job["seed"]).items()})
        compiled = job["path"] == "compiled"
        rows.append(
            _timed_row(job, case, "dense", mode, lambda x, dy: fw.dense(params, x, dy, mode, compiled), fw, meter)
        )
    return rows


def run_sweep(job, fw, backend, meter) -> list[dict]:
    rows = []
    for case_dict, axes in zip(job["cases"], job["axes"]):
        case = BenchCase.from_dict(case_dict)
        row = _timed_row(
            job,
            case,
            job["impl"],
            "forward",
            lambda x, dy, case=case: _peer_call(job, case, fw, backend, x, dy, "forward"),
            fw,
            meter,
        )
        rows.append({**row, "axes": axes})
        gc.collect()
    return rows


def run_bandwidth(job) -> dict:
    """Copy bandwidth, (bytes read + bytes written) / time, median of several copies."""
    if job["device"] == "gpu":
        from .bandwidth import gpu_copy_bandwidth

        return gpu_copy_bandwidth(job["bandwidth_bytes"])
    from .bandwidth import numpy_copy_bandwidth

    return numpy_copy_bandwidth(job["bandwidth_bytes"])


def run(job: dict) -> dict:
    if job["kind"] == "bandwidth":
        return {"bandwidth": run_bandwidth(job)}
    from .frameworks import FRAMEWORKS, NoDevice

    fw = FRAMEWORKS[job["framework"]]()
    try:
        info = fw.setup(job["threads"], job["device"])
    except NoDevice as err:
        return {"skipped": str(err), "blocks_backend": True}
    result = {"framework": info}
    backend = None
    if job["impl"] == "peer":
        import peer_backends

        backend = peer_backends.get(job["backend"].partition(":")[0])
        caps = sorted(backend.capabilities)
        result.update(backend_version=backend.version, capabilities=caps)
        dtype = job["cases"][0]["dtype"]
        if job["path"] == "compiled" and "jit" not in caps:
            return {**result, "skipped": f"backend {job['backend']!r} lacks the 'jit' capability"}
        if dtype not in caps:
            return {**result, "skipped": f"backend {job['backend']!r} lacks the {dtype!r} capability"}
        if job["cases"][0].get("compute_dtype") and "mixed" not in caps:
            return {**result, "skipped": f"backend {job['backend']!r} lacks the 'mixed' capability"}
        if job.get("grads") == "sparse" and "sparse_grad" not in caps:
            return {**result, "skipped": f"backend {job['backend']!r} lacks the 'sparse_grad' capability"}
    elif job["impl"] == "peer_pytorch":
        import PEER_pytorch  # noqa: F401  (an import failure is reported as the skip reason)

        result["backend_version"] = _dist_version("PEER-pytorch")
    device_meter = fw.device_meter()
    meter = device_meter if device_meter is not None else cpu_meter()
    if job["kind"] == "train_step":
        from . import train_step

        runner = train_step.run_job
    else:
        runner = run_sweep if job["kind"] == "sweep" else run_cell
    result["rows"] = runner(job, fw, backend, meter)
    return result


def _dist_version(dist):
    from importlib.metadata import version

    return version(dist)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peer_bench.worker")
    parser.add_argument("--json", required=True, help="the job, as a JSON object")
    job = json.loads(parser.parse_args(argv).json)
    try:
        result = run(job)
    except ImportError as err:
        result = {"skipped": f"not importable: {type(err).__name__}: {err}", "blocks_backend": True}
    except Exception as err:
        result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=8)}
    sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
