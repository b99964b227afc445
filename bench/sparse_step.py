"""Time one Keras training step of the PEER layer with dense and with row-sparse table gradients
(SPEC §7.1), side by side in one process, at several expert counts N, for several Keras optimizers
on the TensorFlow backend (the benchmark harness, ``python -m peer_bench --train-step``, times the
torch and JAX layers' steps).

    python bench/sparse_step.py keras [--n 128 1024] [--d-model 128] [--tokens 2048] [--steps 5] [--only Adam ...]

A step is ``model.train_on_batch`` (not XLA-compiled) of a Keras model holding the layer with
``sparse=False`` and ``sparse=True`` (table gradients as tf.IndexedSlices). Prints the median
wall time per step (after one warm-up step; the dense and sparse steps take turns) and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time


def config(n_keys: int, d_model: int):
    from peer_ref import PEERConfig

    return PEERConfig(d_model=d_model, n_experts=n_keys**2, heads=8, topk=16, d_key=128)


def timed(builds: dict, steps: int) -> dict:
    """Median ms per step of each built step, the steps of a group taking turns (after one
    warm-up each), so that a change in the machine's load affects them alike."""
    runs = {name: build() for name, build in builds.items()}
    for run in runs.values():
        run()  # compile / warm up
    times = {name: [] for name in runs}
    for _ in range(steps):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def keras_steps(cfg, tokens: int):
    import os

    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    import numpy as np

    import peer_backends.keras as pk

    x = np.random.default_rng(0).standard_normal((tokens, cfg.d_model)).astype("float32")
    target = np.zeros((tokens, cfg.d_out), "float32")

    def make(optimizer, sparse):
        def build():
            model = keras.Sequential([keras.Input((cfg.d_model,)), pk.PEER(cfg, seed=0, sparse=sparse)])
            model.compile(optimizer=optimizer(), loss="mse", jit_compile=False)
            return lambda: model.train_on_batch(x, target)

        return build

    optimizers = {
        "SGD": lambda: keras.optimizers.SGD(1e-3),
        "SGD momentum": lambda: keras.optimizers.SGD(1e-3, momentum=0.9),
        "Adagrad": lambda: keras.optimizers.Adagrad(1e-3),
        "Adam": lambda: keras.optimizers.Adam(1e-3),
        "AdamW": lambda: keras.optimizers.AdamW(1e-3),
    }
    return [
        {f"{name}, {kind}": make(optimizer, kind == "sparse") for kind in ("dense", "sparse")}
        for name, optimizer in optimizers.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("framework", choices=("keras",))
    parser.add_argument("--n", type=int, nargs="+", default=[128, 1024], help="sub-keys n (N = n**2)")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--only", nargs="+", help="keras: only these optimizers (e.g. Adam SGD)")
    args = parser.parse_args()
    results = {}
    for n in args.n:
        cfg = config(n, args.d_model)
        for group in keras_steps(cfg, args.tokens):
            if args.only and not any(name.split(",")[0] in args.only for name in group):
                continue
            for name, ms in timed(group, args.steps).items():
                results[(n, name)] = ms
                print(f"N={n}^2 {name}: {ms:.1f} ms/step", flush=True)
    names = list(dict.fromkeys(name for _, name in results))
    print(f"\n| step | {' | '.join(f'N={n}² ms' for n in args.n)} | {args.n[-1]}² / {args.n[0]}² |")
    print(f"|---|{'---|' * len(args.n)}---|")
    for name in names:
        row = [results[(n, name)] for n in args.n]
        print(f"| {name} | {' | '.join(f'{t:.0f}' for t in row)} | {row[-1] / row[0]:.1f}x |")
    for n in args.n:
        for dense, sparse in zip(names[::2], names[1::2]):
            ratio = results[(n, dense)] / results[(n, sparse)]
            print(f"N={n}^2: {dense} / {sparse} = {ratio:.2f}x")


if __name__ == "__main__":
    main()
