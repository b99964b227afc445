"""Time one training step of the PEER layer with dense and with row-sparse table gradients (SPEC §7.1),
side by side in one process, at several expert counts N: JAX (Flax NNX + optax) or Keras on TensorFlow.

    python bench/sparse_step.py jax   [--n 128 1024] [--d-model 128] [--tokens 2048] [--steps 5]
    python bench/sparse_step.py keras [--n 128 1024] [--d-model 128] [--tokens 2048] [--steps 5]

jax: a step is the loss mean(y**2), its gradients and Adam, inside one donating ``nnx.jit``:
"dense" is ``nnx.value_and_grad`` + ``nnx.Optimizer(optax.adam)`` on every parameter; "sparse" is
``peer_backends.jax.sparse_value_and_grad`` + ``nnx.Optimizer(optax.adam, wrt=DENSE_PARAMS)`` +
``RowOptimizer(optax.adam)``. keras: ``model.train_on_batch`` (not XLA-compiled) of a Keras model holding the layer with
``sparse=False`` and ``sparse=True`` (table gradients as tf.IndexedSlices), for several Keras
optimizers. Prints the median
wall time per step (after one warm-up step) and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time


def config(n_keys: int, d_model: int):
    from peer_ref import PEERConfig

    return PEERConfig(d_model=d_model, n_experts=n_keys**2, heads=8, topk=16, d_key=128)


def timed(step, steps: int) -> float:
    step()  # compile / warm up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def jax_steps(cfg, tokens: int):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import peer_backends.jax as pj

    x = jax.random.normal(jax.random.key(0), (tokens, cfg.d_model))

    def loss(model):
        return jnp.mean(model(x) ** 2)

    def dense():
        model = pj.PEER(cfg, rngs=nnx.Rngs(0))
        opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

        @nnx.jit(donate_argnums=(0, 1))
        def step(model, opt):
            value, grads = nnx.value_and_grad(loss)(model)
            opt.update(model, grads)
            return value

        return lambda: step(model, opt).block_until_ready()

    def sparse():
        model = pj.PEER(cfg, rngs=nnx.Rngs(0))
        opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=pj.DENSE_PARAMS)
        rows = pj.RowOptimizer(model, optax.adam(1e-3))

        @nnx.jit(donate_argnums=(0, 1, 2))
        def step(model, opt, rows):
            value, (grads, table_grads) = pj.sparse_value_and_grad(loss)(model)
            opt.update(model, grads)
            rows.update(model, table_grads)
            return value

        return lambda: step(model, opt, rows).block_until_ready()

    return {"dense + adam": dense, "sparse + adam on rows": sparse}


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
    return {
        f"{name}, {kind}": make(optimizer, kind == "sparse")
        for name, optimizer in optimizers.items()
        for kind in ("dense", "sparse")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("framework", choices=("jax", "keras"))
    parser.add_argument("--n", type=int, nargs="+", default=[128, 1024], help="sub-keys n (N = n**2)")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    results = {}
    for n in args.n:
        cfg = config(n, args.d_model)
        steps = (jax_steps if args.framework == "jax" else keras_steps)(cfg, args.tokens)
        for name, build in steps.items():
            results[(n, name)] = timed(build(), args.steps)
            print(f"N={n}^2 {name}: {results[(n, name)]:.1f} ms/step", flush=True)
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
