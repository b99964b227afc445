"""Column-sharded expert tables in JAX on 4 simulated CPU devices, against one device.

XLA reads --xla_force_host_platform_device_count when JAX starts, so this file sets the flag
before importing JAX and runs in a process of its own (the noxfile does so). Collected in a
process where JAX already started with fewer devices, its tests skip and one test reruns the
file in a fresh process instead.
"""

import dataclasses
import os
import re
import subprocess
import sys

import numpy as np
import pytest

DEVICES = 4
FLAG = f"--xla_force_host_platform_device_count={DEVICES}"
if "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FLAG).strip()
jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")
ENOUGH = len(jax.devices()) >= DEVICES
needs_devices = pytest.mark.skipif(not ENOUGH, reason="JAX started with fewer devices: rerun in a fresh process")


@pytest.mark.skipif(ENOUGH, reason="this process has the devices: the tests run here")
def test_in_a_process_of_its_own():
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + FLAG).strip())
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import peer_ref
from peer_backends import jax as be
from peer_backends.jax import parallel
from peer_backends.jax.layer import PEER
from peer_ref.errors import PEERInputError

if ENOUGH:
    jax.config.update("jax_enable_x64", True)  # this process only: float64 compares to 1e-12

CFG = peer_ref.PEERConfig(d_model=12, n_experts=49, heads=3, topk=4, d_key=6, d_out=8, query_bias=True)
# GLU experts (SPEC §3.10): experts.gate is sharded like experts.down, its dots psum'd with them.
GLU = dataclasses.replace(CFG, expert_glu=True, activation="silu")
TOL = dict(rtol=1e-12, atol=1e-12)
COLLECTIVE = re.compile(
    r"=\s*(\(?[^=]*?\)?)\s+(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
    r"(-start)?\("
)


def case(cfg, seed=0, lead=(2, 5)):
    rng = np.random.default_rng(seed)
    params, state = be.init(cfg, seed=seed, dtype="float64")
    x = jnp.asarray(rng.standard_normal(lead + (cfg.d_model,)))
    mask = jnp.asarray(rng.random(lead) > 0.3)
    dy = jnp.asarray(rng.standard_normal(lead + (cfg.d_out,)))
    return params, state, x, mask, dy


def assert_trees_close(actual, expected):
    assert set(actual) == set(expected)
    for name in expected:
        np.testing.assert_allclose(np.asarray(actual[name]), np.asarray(expected[name]), **TOL, err_msg=name)


def collectives(hlo):
    """(op, elements of its largest operand) for every collective in compiled HLO text."""
    found = []
    for match in COLLECTIVE.finditer(hlo):
        shapes = re.findall(r"[a-z]+\d*\[([\d,]*)\]", match.group(1))
        found.append((match.group(2), max(int(np.prod([int(d) for d in s.split(",") if d])) for s in shapes)))
    return found


@needs_devices
@pytest.mark.parametrize("cfg", [CFG, GLU], ids=["single-neuron", "glu"])
def test_functional_equals_one_device_with_tables_at_one_quarter(cfg):
    training = True
    params, state, x, mask, dy = case(cfg)
    mesh = jax.make_mesh((4,), ("model",))
    sharded_params, sharded_state = parallel.shard(cfg, params, state, mesh)
    x_rep, dy_rep = jax.device_put((x, dy), NamedSharding(mesh, PartitionSpec()))
    tables = ("experts.down", "experts.gate", "experts.up") if cfg.expert_glu else ("experts.down", "experts.up")
    assert {n for n, v in sharded_params.items() if v.sharding.spec == PartitionSpec(None, "model")} == set(tables)
    for name in tables:
        shard_shapes = {s.data.shape for s in sharded_params[name].addressable_shards}
        assert shard_shapes == {(cfg.n_experts, params[name].shape[1] // 4)}, name
    assert sharded_params["experts.bias"].sharding.spec == PartitionSpec()

    y, new_state, aux = parallel.apply(cfg, sharded_params, sharded_state, x_rep, training, mask, mesh=mesh)
    y_ref, state_ref, aux_ref = be.apply(cfg, params, state, x, training, mask)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), **TOL)
    assert y.sharding.spec == PartitionSpec(None, None, "model")
    assert_trees_close(new_state, state_ref)
    np.testing.assert_array_equal(np.asarray(aux["indices"]), np.asarray(aux_ref["indices"]))

    grads, dx = parallel.vjp(cfg, sharded_params, sharded_state, x_rep, dy_rep, training, mask, mesh=mesh)
    grads_ref, dx_ref = be.vjp(cfg, params, state, x, dy, training, mask)
    assert_trees_close(grads, grads_ref)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_ref), **TOL)
    for name in tables:
        assert grads[name].sharding.spec == PartitionSpec(None, "model"), name


@needs_devices
@pytest.mark.parametrize("cfg", [CFG, GLU], ids=["single-neuron", "glu"])
def test_no_collective_moves_a_table(cfg):
    """The compiled step's collectives carry T*heads*topk dots (2*T*heads*topk stacked with the
    gate's for GLU experts) or T*d activations, nothing of size N*d."""
    params, state, x, mask, dy = case(cfg)
    mesh = jax.make_mesh((4,), ("model",))
    sharded_params, sharded_state = parallel.shard(cfg, params, state, mesh)
    x, dy = jax.device_put((x, dy), NamedSharding(mesh, PartitionSpec()))  # replicated, as in a network
    tokens = x.shape[0] * x.shape[1]
    dots, activations = tokens * cfg.heads * cfg.topk, tokens * max(cfg.d_model, cfg.d_out)
    forward_dots = (2 if cfg.expert_glu else 1) * dots
    sharded = dict(implementation="sharded", layout=(mesh, "model"))
    forward = (
        be.peer.forward_jit.lower(cfg, True, sharded_params, sharded_state, x, mask, None, **sharded)
        .compile()
        .as_text()
    )
    step = (
        be.peer.vjp_jit.lower(cfg, True, sharded_params, sharded_state, x, dy, mask, None, **sharded)
        .compile()
        .as_text()
    )
    found_forward, found_step = collectives(forward), collectives(step)
    # Forward: one all-reduce, of the stacked partial dots; y stays sharded by features.
    assert found_forward == [("all-reduce", forward_dots)], found_forward
    # Forward and backward: the partial dots' and the coefficient gradient's all-reduces (XLA
    # may merge them into one), the x gradient's all-gather.
    assert sorted(found_step) in (
        [("all-gather", activations), ("all-reduce", forward_dots)],
        sorted([("all-gather", activations), ("all-reduce", forward_dots), ("all-reduce", dots)]),
    ), found_step


# Evaluation mode is checked here, on the 2-D mesh (training above and below).
@needs_devices
@pytest.mark.parametrize("axis_type, training", [(AxisType.Auto, True), (AxisType.Explicit, False)])
def test_data_axis_shards_tokens_and_model_axis_shards_tables(axis_type, training):
    params, state, x, mask, dy = case(CFG, seed=1, lead=(4, 3))
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(axis_type, axis_type))
    sharded_params, sharded_state = parallel.shard(CFG, params, state, mesh)
    x_data, mask_data, dy_data = jax.device_put((x, mask, dy), NamedSharding(mesh, PartitionSpec("data")))
    y, new_state, _ = parallel.apply(CFG, sharded_params, sharded_state, x_data, training, mask_data, mesh=mesh)
    y_ref, state_ref, _ = be.apply(CFG, params, state, x, training, mask)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), **TOL)
    assert_trees_close(new_state, state_ref)  # batch statistics over the whole batch
    grads, dx = parallel.vjp(CFG, sharded_params, sharded_state, x_data, dy_data, training, mask_data, mesh=mesh)
    grads_ref, dx_ref = be.vjp(CFG, params, state, x, dy, training, mask)
    assert_trees_close(grads, grads_ref)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_ref), **TOL)


@needs_devices
@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_tied_scores_route_like_the_reference_on_data_sharded_tokens(axis_type):
    """Integer-valued query kernel, sub-keys and tokens tie scores everywhere, so the pruned
    stage-two search redoes rows under the full order (SPEC §4.1), here with the tokens split
    over the data axis (explicit sharding redoes every row, auto picks the tied ones). Without
    query normalisation, so that the scores are exact integers in every backend."""
    cfg = dataclasses.replace(CFG, query_norm="none")
    params, state, x, _, _ = case(cfg, seed=3, lead=(8, 6))
    rng = np.random.default_rng(3)
    params = {name: np.asarray(value) for name, value in params.items()}
    state = {name: np.asarray(value) for name, value in state.items()}
    for name in ("query.kernel", "keys.left", "keys.right"):
        params[name] = rng.integers(-1, 2, params[name].shape).astype(np.float64)
    x = rng.integers(-1, 2, x.shape).astype(np.float64)
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(axis_type, axis_type))
    sharded_params, sharded_state = parallel.shard(
        cfg, jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, state), mesh
    )
    x_data = jax.device_put(jnp.asarray(x), NamedSharding(mesh, PartitionSpec("data")))
    _, _, aux = parallel.apply(cfg, sharded_params, sharded_state, x_data, mesh=mesh)
    _, _, aux_ref = peer_ref.forward(cfg, params, state, x)
    np.testing.assert_array_equal(np.asarray(aux["indices"]), aux_ref["indices"])


@needs_devices
def test_nnx_layer_trains_under_nnx_jit_like_one_device():
    _, _, x, mask, dy = case(CFG, seed=2)
    mesh = jax.make_mesh((4,), ("model",))
    reference = PEER(CFG, seed=4, param_dtype=jnp.float64)
    sharded = parallel.shard_layer(PEER(CFG, seed=4, param_dtype=jnp.float64), mesh)
    assert sharded.experts.down.get_value().sharding.spec == PartitionSpec(None, "model")

    @nnx.jit
    def step(layer, x, mask, dy):
        def loss(layer):
            return jnp.sum(layer(x, mask=mask) * dy)

        return nnx.value_and_grad(loss)(layer)

    for _ in range(2):  # the running statistics move twice
        value, grads = step(sharded, x, mask, dy)
        value_ref, grads_ref = step(reference, x, mask, dy)
        np.testing.assert_allclose(float(value), float(value_ref), **TOL)

        def flat(g):
            return {".".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(g)}

        assert_trees_close(flat(grads), flat(grads_ref))
        assert_trees_close(sharded.params_and_state()[1], reference.params_and_state()[1])
    sharded.eval()
    reference.eval()
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, x: m(x))(sharded, x)), np.asarray(reference(x)), **TOL)


@needs_devices
def test_bad_mesh_and_axis_are_refused():
    params, state, x, _, _ = case(CFG)
    mesh = jax.make_mesh((4,), ("model",))
    with pytest.raises(PEERInputError, match=r"axis='tp', but expected one of the mesh's axes \('model',\)"):
        parallel.shard(CFG, params, state, mesh, axis="tp")
    with pytest.raises(PEERInputError, match="mesh is str, but expected a jax.sharding.Mesh"):
        parallel.apply(CFG, params, state, x, mesh="model")
    odd = peer_ref.PEERConfig(d_model=12, n_experts=16, heads=1, topk=2, d_key=4, d_out=6)
    with pytest.raises(PEERInputError, match="experts.up has 6 columns, but expected a multiple of the 4 devices"):
        parallel.shard(odd, *be.init(odd), mesh)
    with pytest.raises(PEERInputError, match="x"):
        parallel.apply(CFG, params, state, x[..., :5], mesh=mesh)


@needs_devices
@pytest.mark.parametrize("low", ["bfloat16", "float16"])
def test_mixed_precision_runs_sharded_like_one_device(low):
    """SPEC §10.3 on sharded tables: float32 parameters, x and dy in the low dtype, each device's
    table columns read rounded to it; the functional API and the NNX layer (dtype=low) alike."""
    params, state = be.init(GLU, seed=5)
    _, _, x, mask, dy = case(GLU, seed=5)
    x, dy = x.astype(low), dy.astype(low)
    mesh = jax.make_mesh((4,), ("model",))
    sharded_params, sharded_state = parallel.shard(GLU, params, state, mesh)
    y, new_state, aux = be.apply(GLU, sharded_params, sharded_state, x, True, mask, compute_dtype=low)
    y_ref, state_ref, aux_ref = be.apply(GLU, params, state, x, True, mask, compute_dtype=low)
    assert y.dtype == jnp.dtype(low) and tuple(y.sharding.spec)[-1] == "model"
    np.testing.assert_array_equal(np.asarray(aux["indices"]), np.asarray(aux_ref["indices"]))
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32), rtol=1e-2, atol=1e-2)
    for name in state_ref:
        np.testing.assert_allclose(np.asarray(new_state[name]), np.asarray(state_ref[name]), rtol=1e-6, atol=1e-6)
    grads, dx = be.vjp(GLU, sharded_params, sharded_state, x, dy, True, mask, compute_dtype=low)
    grads_ref, dx_ref = be.vjp(GLU, params, state, x, dy, True, mask, compute_dtype=low)
    assert dx.dtype == jnp.dtype(low)
    np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(dx_ref, np.float32), rtol=1e-2, atol=1e-2)
    for name in grads_ref:
        assert grads[name].dtype == jnp.float32, name
        np.testing.assert_allclose(
            np.asarray(grads[name]), np.asarray(grads_ref[name]), rtol=1e-2, atol=1e-2, err_msg=name
        )
    layer = parallel.shard_layer(PEER(GLU, seed=5, dtype=jnp.dtype(low)), mesh)
    reference = PEER(GLU, seed=5, dtype=jnp.dtype(low))
    got = nnx.jit(lambda m, x: m(x, mask=mask))(layer, x)
    want = nnx.jit(lambda m, x: m(x, mask=mask))(reference, x)
    assert got.dtype == jnp.dtype(low) and tuple(got.sharding.spec)[-1] == "model"
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-2, atol=1e-2)
