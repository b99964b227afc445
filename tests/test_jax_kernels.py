"""The JAX backend's Pallas kernels (implementation="pallas") against its XLA path.

Off GPUs the kernels run in Pallas's interpreter, so these tests check the kernels' arithmetic
(indexing, masked tails, segmented sums, custom_vjp), not the Triton compilation.
"""

import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")

import jax.numpy as jnp

import peer_ref
from peer_backends import jax as be
from peer_backends.jax import kernels, parallel
from peer_backends.jax.experts import chunked_experts
from peer_backends.jax.layer import PEER
from peer_backends.jax.peer import choose_implementation
from peer_ref.config import ACTIVATIONS
from peer_ref.errors import PEERConfigError


def stage(tokens, heads, topk, n, d_model, d_out, glu, bias, dtype=jnp.float32, seed=0):
    """Random expert-stage inputs; indices drawn from few experts and one pair forced equal,
    so selections repeat within and across tokens (duplicates)."""
    rng = np.random.default_rng(seed)

    def arr(*shape):
        return jnp.asarray(rng.standard_normal(shape), dtype)

    indices = rng.integers(0, n, (tokens, heads, topk))
    if heads * topk > 1 and tokens:
        indices.reshape(tokens, -1)[:, 1] = indices.reshape(tokens, -1)[:, 0]
    return dict(
        x=arr(tokens, d_model),
        indices=jnp.asarray(indices, jnp.int32),
        weights=arr(tokens, heads, topk),
        down=arr(n, d_model),
        up=arr(n, d_out),
        bias=arr(n) if bias else None,
        gate=arr(n, d_model) if glu else None,
    ), arr(tokens, d_out)


def run(path, activation, low, inputs, dy):
    """(y, gradients of every differentiable input) through ``path`` under jax.jit."""
    names = [k for k in ("x", "weights", "down", "up", "bias", "gate") if inputs[k] is not None]

    def f(diff):
        args = {**inputs, **diff}
        if path == "pallas":
            return kernels.pallas_experts(
                activation,
                low,
                args["x"],
                args["indices"],
                args["weights"],
                args["down"],
                args["up"],
                args["bias"],
                args["gate"],
            )
        return chunked_experts(
            activation,
            7,
            low,
            args["x"],
            args["indices"],
            args["weights"],
            args["down"],
            args["up"],
            args["bias"],
            args["gate"],
        )

    @jax.jit
    def both(diff):
        y, pullback = jax.vjp(f, diff)
        return y, pullback(dy)[0]

    return both({k: inputs[k] for k in names})


def assert_same(pallas, xla, tol):
    y, grads = pallas
    y_ref, grads_ref = xla
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape

    def scale(a):
        return max(1.0, float(jnp.max(jnp.abs(a), initial=0.0)))

    assert float(jnp.max(jnp.abs(y - y_ref), initial=0.0)) <= tol * scale(y_ref), "y"
    for name, g in grads_ref.items():
        assert grads[name].dtype == g.dtype and grads[name].shape == g.shape, name
        err = float(jnp.max(jnp.abs(grads[name] - g), initial=0.0))
        assert err <= tol * scale(g), f"d_{name}: max error {err}"


# (tokens, heads, topk, n_experts, d_model, d_out, glu, bias): odd widths (masked tails),
# N = 1 and d = 1, heads * topk not a power of two, more selections than experts.
SHAPES = [
    (5, 3, 4, 64, 12, 5, False, False),
    (9, 2, 3, 7, 13, 600, True, True),  # d_out over one column block: two blocks, masked tail
    (3, 1, 1, 1, 1, 1, True, False),
    (4, 4, 2, 3, 6, 17, False, True),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:6])) + "-glu" * s[6] + "-bias" * s[7])
def test_matches_xla_path(shape):
    inputs, dy = stage(*shape)
    assert_same(run("pallas", "silu", None, inputs, dy), run("xla", "silu", None, inputs, dy), 1e-5)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation(activation):
    inputs, dy = stage(6, 2, 2, 5, 5, 3, True, True, seed=1)
    assert_same(run("pallas", activation, None, inputs, dy), run("xla", activation, None, inputs, dy), 1e-5)


def test_float64(x64):
    inputs, dy = stage(7, 2, 3, 6, 9, 4, True, True, dtype=jnp.float64, seed=2)
    out = run("pallas", "gelu", None, inputs, dy)
    assert out[0].dtype == jnp.float64
    assert_same(out, run("xla", "gelu", None, inputs, dy), 1e-12)


@pytest.mark.parametrize("low", ["bfloat16", "float16"])
def test_mixed_mode_reads_rounded_rows(low):
    """SPEC §10.3: rows rounded to ``low`` as read, float32 sums, straight-through table gradients."""
    inputs, dy = stage(6, 2, 2, 5, 11, 6, True, True, seed=3)
    pallas = run("pallas", "gelu_tanh", low, inputs, dy)
    assert_same(pallas, run("xla", "gelu_tanh", low, inputs, dy), 1e-5)
    assert all(g.dtype == jnp.float32 for g in pallas[1].values())
    # The rounding is seen: reading unrounded rows gives a different y.
    assert float(jnp.max(jnp.abs(pallas[0] - run("pallas", "gelu_tanh", None, inputs, dy)[0]))) > 1e-4


def test_zero_tokens():
    inputs, dy = stage(0, 2, 3, 5, 4, 3, True, True)
    y, grads = run("pallas", "relu", None, inputs, dy)
    assert y.shape == (0, 3) and grads["x"].shape == (0, 4) and grads["weights"].shape == (0, 2, 3)
    for name in ("down", "up", "bias", "gate"):
        assert grads[name].shape == inputs[name].shape and not np.any(np.asarray(grads[name]))


def test_deterministic_and_zero_rows_stay_finite():
    inputs, dy = stage(8, 2, 4, 4, 6, 5, True, True, seed=4)
    inputs["x"] = inputs["x"].at[:3].set(0.0)  # masked tokens arrive as zero rows
    dy = dy.at[:3].set(0.0)
    first, second = run("pallas", "gelu", None, inputs, dy), run("pallas", "gelu", None, inputs, dy)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
        assert np.all(np.isfinite(np.asarray(a)))


CFG = peer_ref.PEERConfig(
    d_model=10, n_experts=49, heads=2, topk=3, d_key=6, d_out=7, expert_glu=True, expert_bias=True, activation="gelu"
)


def layer_case(cfg, dtype="float32", lead=(2, 5)):
    rng = np.random.default_rng(5)
    params, state = be.init(cfg, seed=1, dtype=dtype)
    x = jnp.asarray(rng.standard_normal(lead + (cfg.d_model,)), dtype)
    dy = jnp.asarray(rng.standard_normal(lead + (cfg.d_out,)), dtype)
    return params, state, x, jnp.asarray(rng.random(lead) > 0.3), dy


@pytest.mark.parametrize("jit", [None, False])
def test_apply_and_vjp_take_pallas(jit):
    params, state, x, mask, dy = layer_case(CFG)
    for training in (False, True):
        outs = {
            name: (
                be.apply(CFG, params, state, x, training, mask, jit=jit, implementation=name),
                be.vjp(CFG, params, state, x, dy, training, mask, jit=jit, implementation=name),
            )
            for name in ("pallas", "xla")
        }
        (y, new_state, aux), (grads, dx) = outs["pallas"]
        (y_ref, state_ref, aux_ref), (grads_ref, dx_ref) = outs["xla"]
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(aux["indices"], aux_ref["indices"])
        for name in grads_ref:
            np.testing.assert_allclose(grads[name], grads_ref[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_sparse_vjp_takes_pallas():
    """SPEC §7.1 on implementation "pallas": the same rows as "xla" and its dense gradient's rows."""
    params, state, x, mask, dy = layer_case(CFG)
    grads, dx = be.to_numpy(be.vjp(CFG, params, state, x, dy, True, mask, implementation="pallas", sparse=True))
    dense, dx_ref = be.to_numpy(be.vjp(CFG, params, state, x, dy, True, mask, implementation="xla"))
    xla = be.to_numpy(be.vjp(CFG, params, state, x, dy, True, mask, implementation="xla", sparse=True))[0]
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-6)
    for name in peer_ref.EXPERT_TABLES:
        assert isinstance(grads[name], peer_ref.RowSparse), name
        np.testing.assert_array_equal(grads[name].rows, xla[name].rows)
        assert 0 < len(grads[name].rows) < CFG.n_experts, name
        np.testing.assert_allclose(grads[name].densify(CFG.n_experts), dense[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_layer_keyword():
    layer = PEER(CFG, seed=1, implementation="pallas")
    reference = PEER(CFG, seed=1, implementation="xla")
    assert layer.implementation == "pallas" and PEER(CFG, seed=0).implementation is None
    x = jnp.asarray(np.random.default_rng(6).standard_normal((3, CFG.d_model)), jnp.float32)
    np.testing.assert_allclose(layer(x), reference(x), rtol=1e-5, atol=1e-6)
    grad = nnx.grad(lambda m: jnp.sum(m(x) ** 2))
    g, g_ref = nnx.state(grad(layer), nnx.Param), nnx.state(grad(reference), nnx.Param)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(PEERConfigError, match=r"implementation='triton'.*'pallas'"):
        PEER(CFG, implementation="triton")


def test_choice_and_errors():
    assert be.implementations == ("xla", "pallas", "sharded")
    assert choose_implementation(None) == ("pallas" if jax.default_backend() == "gpu" else "xla")
    assert choose_implementation("pallas") == "pallas"
    params, state, x, mask, dy = layer_case(CFG)
    for bad in ("triton", "PALLAS", 3):
        with pytest.raises(PEERConfigError, match=r"implementation=.*has \['pallas', 'sharded', 'xla'\]"):
            be.apply(CFG, params, state, x, implementation=bad)
        with pytest.raises(PEERConfigError, match=r"implementation=.*has \['pallas', 'sharded', 'xla'\]"):
            be.vjp(CFG, params, state, x, dy, implementation=bad)
    with pytest.raises(
        PEERConfigError,
        match=r"implementation='sharded' is not available here: the expert tables "
        r"are not sharded",
    ):
        be.apply(CFG, params, state, x, implementation="sharded")
    mesh = jax.make_mesh((1,), ("model",))
    sharded_run = r"implementation='pallas' is not available here: the expert tables are sharded .* run 'sharded'"
    with pytest.raises(PEERConfigError, match=sharded_run):
        parallel.apply(CFG, params, state, x, mesh=mesh, implementation="pallas")
    with pytest.raises(PEERConfigError, match=sharded_run):
        parallel.vjp(CFG, params, state, x, dy, mesh=mesh, implementation="pallas")
    with pytest.raises(PEERConfigError, match=r"implementation='pallas', but sharded expert tables run 'sharded'"):
        parallel.shard_layer(PEER(CFG, seed=0, implementation="pallas"), mesh)
    with pytest.raises(PEERConfigError, match=r"implementation='triton'"):
        parallel.apply(CFG, params, state, x, mesh=mesh, implementation="triton")


def test_pallas_is_imported_only_when_its_path_runs():
    code = (
        "import sys, numpy as np, peer_ref, peer_backends.jax as be\n"
        "cfg = peer_ref.PEERConfig(d_model=4, n_experts=4, heads=1, topk=1, d_key=2, d_out=3)\n"
        "p, s = be.init(cfg)\n"
        "be.apply(cfg, p, s, be.from_numpy(np.ones((2, 4), 'float32')))\n"
        "assert 'jax.experimental.pallas' not in sys.modules and 'peer_backends.jax.kernels' not in sys.modules\n"
        "be.apply(cfg, p, s, be.from_numpy(np.ones((2, 4), 'float32')), implementation='pallas')\n"
        "assert 'jax.experimental.pallas' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
