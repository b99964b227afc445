"""The physical limit: how fast this machine copies memory, (bytes read + bytes written) / time."""

from __future__ import annotations

import time

import numpy as np

COPIES = 7


def _summary(times, nbytes, method) -> dict:
    median = float(np.median(times))
    return {
        "bytes_per_s": 2 * nbytes / median,
        "best_bytes_per_s": 2 * nbytes / min(times),
        "array_bytes": nbytes,
        "copies": len(times),
        "method": method,
    }


def numpy_copy_bandwidth(nbytes: int) -> dict:
    """np.copyto between two arrays far larger than the caches (single-threaded, as NumPy copies)."""
    src = np.ones(nbytes // 8, np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch every page before timing
    times = []
    for _ in range(COPIES):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    return _summary(times, src.nbytes, "numpy.copyto, one thread, median of 7")


def gpu_copy_bandwidth(nbytes: int) -> dict:
    """Device-to-device copy with torch, else jax."""
    try:
        import torch

        if torch.cuda.is_available():
            src = torch.ones(nbytes // 4, device="cuda")
            dst = torch.empty_like(src)
            dst.copy_(src)
            times = []
            for _ in range(COPIES):
                torch.cuda.synchronize()
                start = time.perf_counter()
                dst.copy_(src)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            return _summary(times, src.numel() * 4, "torch.Tensor.copy_ on cuda, median of 7")
    except ImportError:
        pass
    import jax
    import jax.numpy as jnp

    src = jax.device_put(jnp.ones(nbytes // 4, jnp.float32), jax.devices("gpu")[0])
    copy = jax.jit(lambda a: a + 0.0)
    copy(src).block_until_ready()
    times = []
    for _ in range(COPIES):
        start = time.perf_counter()
        copy(src).block_until_ready()
        times.append(time.perf_counter() - start)
    return _summary(times, int(src.size) * 4, "jax.jit(a + 0) on gpu, median of 7")
