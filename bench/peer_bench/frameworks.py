"""What the worker needs from each framework: thread and device setup, moving arrays to the device,
waiting for results, device memory, and the equal-FLOP dense FFN. Only the worker imports this
module, and each class imports its framework when set up, so one worker loads one framework."""

from __future__ import annotations

import contextlib
import math

import numpy as np

from peer_backends._tree import map_tree


class NoDevice(RuntimeError):
    """The requested device is not visible to the framework."""


class Numpy:
    name = "numpy"

    def setup(self, threads: int, device: str) -> dict:
        if device != "cpu":
            raise NoDevice("numpy runs on the CPU only")
        # BLAS threads come from OMP_NUM_THREADS/OPENBLAS_NUM_THREADS, set before the import.
        return {"version": np.__version__, "device": "cpu", "threads": threads}

    def put(self, array):
        return array

    def to_device(self, tree):
        return tree

    def block(self, tree):
        return None

    def call_context(self, mode):
        return contextlib.nullcontext()

    def device_meter(self):
        return None

    def dense(self, p, x, dy, mode, compiled):
        if compiled:
            raise NoDevice("numpy has no compiled path")
        if mode == "forward":
            return lambda: _numpy_dense(p, x)[0]
        return lambda: _numpy_dense_vjp(p, x, dy)


_SQRT_HALF = 1.0 / math.sqrt(2.0)


def _erf(z):
    # Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7, below float32 resolution): NumPy has no
    # vectorised erf, and the exact scalar one would make the dense baseline look far slower.
    sign = np.sign(z)
    a = np.abs(z)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))


def _numpy_dense(p, x):
    pre = x @ p["w1"] + p["b1"]
    hidden = 0.5 * pre * (1.0 + _erf(pre * _SQRT_HALF))
    return hidden @ p["w2"] + p["b2"], pre, hidden


def _numpy_dense_vjp(p, x, dy):
    _, pre, hidden = _numpy_dense(p, x)
    cdf = 0.5 * (1.0 + _erf(pre * _SQRT_HALF))
    pdf = np.exp(-0.5 * pre * pre) / math.sqrt(2.0 * math.pi)
    dpre = (dy @ p["w2"].T) * (cdf + pre * pdf)
    grads = {"w1": x.T @ dpre, "b1": dpre.sum(0), "w2": hidden.T @ dy, "b2": dy.sum(0)}
    return grads, dpre @ p["w1"].T


class Torch:
    name = "torch"

    def setup(self, threads, device):
        import torch

        self.torch = torch
        torch.set_num_threads(threads)
        if device == "gpu" and not torch.cuda.is_available():
            raise NoDevice("torch sees no CUDA device")
        self.device = torch.device("cuda" if device == "gpu" else "cpu")
        name = torch.cuda.get_device_name(0) if device == "gpu" else "cpu"
        return {"version": torch.__version__, "device": name, "threads": torch.get_num_threads()}

    def put(self, array):
        torch = self.torch
        if array.dtype.name == "bfloat16":
            tensor = torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
        else:
            tensor = torch.from_numpy(np.ascontiguousarray(array))
        return tensor.to(self.device)

    def to_device(self, tree):
        return map_tree(lambda t: t.to(self.device), tree)

    def block(self, tree):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def call_context(self, mode):
        # Inference does not record the autograd graph, as torch users would run it.
        return self.torch.no_grad() if mode == "forward" else contextlib.nullcontext()

    def device_meter(self):
        return _TorchCudaMeter(self.torch) if self.device.type == "cuda" else None

    def dense(self, p, x, dy, mode, compiled):
        torch = self.torch
        gelu = torch.nn.functional.gelu

        def ffn(x, w1, b1, w2, b2):
            return gelu(x @ w1 + b1) @ w2 + b2

        fn = torch.compile(ffn) if compiled else ffn
        leaves = [x, p["w1"], p["b1"], p["w2"], p["b2"]]
        if mode == "forward":
            return lambda: fn(*leaves)
        leaves = [t.detach().requires_grad_(True) for t in leaves]
        return lambda: torch.autograd.grad(fn(*leaves), leaves, dy)


class _TorchCudaMeter:
    resets = True
    method = "torch.cuda.max_memory_allocated"

    def __init__(self, torch):
        self.cuda = torch.cuda

    def reset(self):
        self.cuda.synchronize()
        self.cuda.reset_peak_memory_stats()
        return self.cuda.memory_allocated()

    def peak(self):
        self.cuda.synchronize()
        return self.cuda.max_memory_allocated()


class Jax:
    name = "jax"

    def setup(self, threads, device):
        # Threads: XLA_FLAGS in the environment, set before this import.
        import jax

        self.jax = jax
        devices = jax.devices("gpu") if device == "gpu" and _has_platform(jax, "gpu") else None
        if device == "gpu" and not devices:
            raise NoDevice("jax sees no GPU")
        self.device = devices[0] if devices else jax.devices("cpu")[0]
        return {"version": jax.__version__, "device": str(self.device.device_kind), "threads": threads}

    def put(self, array):
        return self.jax.device_put(array, self.device)

    def to_device(self, tree):
        return self.jax.device_put(tree, self.device)

    def block(self, tree):
        self.jax.block_until_ready(tree)

    def call_context(self, mode):
        return contextlib.nullcontext()

    def device_meter(self):
        return _JaxMeter(self.device) if self.device.platform == "gpu" else None

    def dense(self, p, x, dy, mode, compiled):
        jax = self.jax

        def ffn(p, x):
            return jax.nn.gelu(x @ p["w1"] + p["b1"], approximate=False) @ p["w2"] + p["b2"]

        if mode == "forward":
            fn = jax.jit(ffn) if compiled else ffn
            return lambda: fn(p, x)

        def ffn_vjp(p, x, dy):
            return jax.vjp(ffn, p, x)[1](dy)

        fn = jax.jit(ffn_vjp) if compiled else ffn_vjp
        return lambda: fn(p, x, dy)


def _has_platform(jax, platform):
    try:
        return bool(jax.devices(platform))
    except RuntimeError:
        return False


class _JaxMeter:
    resets = False  # XLA keeps one peak for the whole process
    method = "jax Device.memory_stats peak_bytes_in_use"

    def __init__(self, device):
        self.device = device

    def reset(self):
        return (self.device.memory_stats() or {}).get("bytes_in_use", 0)

    def peak(self):
        return (self.device.memory_stats() or {}).get("peak_bytes_in_use", 0)


class Tensorflow:
    name = "tensorflow"

    def setup(self, threads, device):
        import tensorflow as tf

        self.tf = tf
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        gpus = tf.config.list_physical_devices("GPU")
        if device == "gpu" and not gpus:
            raise NoDevice("tensorflow sees no GPU")
        self.device = "/GPU:0" if device == "gpu" else "/CPU:0"
        return {
            "version": tf.__version__,
            "device": self.device,
            "threads": tf.config.threading.get_intra_op_parallelism_threads(),
        }

    def put(self, array):
        with self.tf.device(self.device):
            return self.tf.constant(array)

    def to_device(self, tree):
        with self.tf.device(self.device):
            return map_tree(self.tf.identity, tree)

    def block(self, tree):
        if self.device.startswith("/GPU"):
            self.tf.test.experimental.sync_devices()

    def call_context(self, mode):
        return self.tf.device(self.device)

    def device_meter(self):
        return _TfMeter(self.tf) if self.device.startswith("/GPU") else None

    def dense(self, p, x, dy, mode, compiled):
        tf = self.tf

        def ffn(x, w1, b1, w2, b2):
            return tf.nn.gelu(x @ w1 + b1, approximate=False) @ w2 + b2

        leaves = [x, p["w1"], p["b1"], p["w2"], p["b2"]]
        if mode == "forward":
            fn = tf.function(ffn, jit_compile=True) if compiled else ffn
            return lambda: fn(*leaves)

        def ffn_vjp(x, w1, b1, w2, b2, dy):
            inputs = [x, w1, b1, w2, b2]
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                y = ffn(*inputs)
            return tape.gradient(y, inputs, output_gradients=dy)

        fn = tf.function(ffn_vjp, jit_compile=True) if compiled else ffn_vjp
        return lambda: fn(*leaves, dy)


class _TfMeter:
    resets = True
    method = "tf.config.experimental.get_memory_info peak"

    def __init__(self, tf):
        self.experimental = tf.config.experimental

    def reset(self):
        self.experimental.reset_memory_stats("GPU:0")
        return self.experimental.get_memory_info("GPU:0")["current"]

    def peak(self):
        return self.experimental.get_memory_info("GPU:0")["peak"]


FRAMEWORKS = {"numpy": Numpy, "torch": Torch, "jax": Jax, "tensorflow": Tensorflow}
