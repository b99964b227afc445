"""Row-sparse table gradients in JAX (SPEC §7.1): vjp(sparse=True), the optax step on rows,
and the NNX layer's sparse_value_and_grad. Configs are tiny and share shapes (JAX compiles per shape)."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")
optax = pytest.importorskip("optax")

import jax.numpy as jnp

import peer_ref
from peer_backends import jax as be
from peer_ref.errors import PEERConfigError, PEERInputError

PLAIN = peer_ref.PEERConfig(d_model=8, n_experts=36, heads=2, topk=3, d_key=4, expert_bias=False)
GLU = peer_ref.PEERConfig(d_model=8, n_experts=36, heads=2, topk=3, d_key=4, expert_glu=True, expert_bias=True)
TOKENS = (3, 4)
TOL = peer_ref.TOLERANCES["float32"]


def case(cfg, seed=0, dtype="float32"):
    rng = np.random.default_rng(seed)
    params, state = peer_ref.init(cfg, seed=seed, dtype="float32")
    x = rng.standard_normal(TOKENS + (cfg.d_model,)).astype(dtype)
    dy = rng.standard_normal(TOKENS + (cfg.d_out,)).astype(dtype)
    mask = np.array([[True, False, True, True], [True, True, False, True], [False, True, True, True]])
    return params, state, x, dy, mask


def scaled_close(actual, expected, rtol, atol, what):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(1.0, np.max(np.abs(expected), initial=0.0))
    assert np.all(np.abs(actual - expected) <= atol * scale + rtol * np.abs(expected)), what


def check_sparse(cfg, params, state, x, dy, mask=None, routing=None, compute_dtype=None, **kwargs):
    """vjp(sparse=True) through to_numpy: peer_ref.RowSparse whose rows are the reference's rows for
    the backend's own routing, whose values are the dense gradient's rows (and the reference's)."""
    j = be.from_numpy
    args = (cfg, j(params), j(state), j(x), j(dy), True, None if mask is None else j(mask))
    opts = {"routing": None if routing is None else j(routing), "compute_dtype": compute_dtype, **kwargs}
    sparse, dx_sparse = be.to_numpy(be.vjp(*args, sparse=True, **opts))
    dense, dx_dense = be.to_numpy(be.vjp(*args, **opts))
    _, _, aux = be.apply(*args[:4], True, args[6], routing=opts["routing"], compute_dtype=compute_dtype)
    indices = np.asarray(aux["indices"])
    valid = np.ones(TOKENS, bool) if mask is None else mask
    reference, _ = peer_ref.vjp(
        cfg, params, state, x, dy, True, mask, routing=indices, compute_dtype=compute_dtype, sparse=True
    )
    tol = TOL if compute_dtype is None else peer_ref.TOLERANCES[compute_dtype]
    np.testing.assert_array_equal(dx_sparse, dx_dense)
    for name, grad in sparse.items():
        if name not in peer_ref.EXPERT_TABLES:
            np.testing.assert_array_equal(grad, dense[name])
            continue
        assert isinstance(grad, peer_ref.RowSparse)
        assert grad.rows.dtype == np.int64 and grad.values.dtype == np.float32
        np.testing.assert_array_equal(grad.rows, peer_ref.gradient_rows(indices, valid))
        np.testing.assert_array_equal(grad.rows, reference[name].rows)
        scaled_close(grad.densify(cfg.n_experts), dense[name], TOL.grad_rtol, TOL.grad_atol, name)
        scaled_close(grad.values, reference[name].values, tol.grad_rtol, tol.grad_atol, name)
    return sparse


@pytest.mark.parametrize("cfg", [PLAIN, GLU], ids=["plain", "glu-bias"])
def test_sparse_rows_are_the_dense_gradients_rows_with_a_mask(cfg):
    params, state, x, dy, mask = case(cfg)
    sparse = check_sparse(cfg, params, state, x, dy, mask)
    assert 0 < len(sparse["experts.down"].rows) < cfg.n_experts


def test_masked_tokens_list_no_rows_and_a_routing_override_lists_repeats_once():
    params, state, x, dy, mask = case(GLU, seed=1)
    routing = np.zeros(TOKENS + (GLU.heads, GLU.topk), np.int32)
    routing[..., 0, :] = [5, 5, 7]  # repeated within a token and across tokens
    routing[..., 1, :] = [35, 7, 0]
    routing[~mask] = 20  # selected only by masked tokens: not listed
    sparse = check_sparse(GLU, params, state, x, dy, mask, routing=routing)
    np.testing.assert_array_equal(sparse["experts.up"].rows, [0, 5, 7, 35])


def test_mixed_mode_values_are_float32():
    params, state, x, dy, mask = case(GLU, seed=2, dtype="float32")
    low = peer_ref.forward_pass.low_numpy_dtype("bfloat16")
    check_sparse(GLU, params, state, x.astype(low), dy.astype(low), mask, compute_dtype="bfloat16")


def test_zero_valid_tokens_give_zero_rows():
    params, state, x, dy, mask = case(GLU)
    sparse = check_sparse(GLU, params, state, x, dy, np.zeros(TOKENS, bool))
    assert sparse["experts.down"].rows.shape == (0,) and sparse["experts.down"].values.shape == (0, GLU.d_model)


def test_eager_path_agrees_with_the_compiled_path():
    """(The "pallas" implementation's sparse vjp: tests/test_jax_kernels.py, under the interpreter.)"""
    params, state, x, dy, mask = case(GLU)
    j = be.from_numpy
    args = (GLU, j(params), j(state), j(x), j(dy), True, j(mask))
    compiled = be.to_numpy(be.vjp(*args, sparse=True))[0]
    eager = be.to_numpy(be.vjp(*args, sparse=True, jit=False))[0]
    for name in peer_ref.EXPERT_TABLES:
        np.testing.assert_array_equal(eager[name].rows, compiled[name].rows)
        scaled_close(eager[name].values, compiled[name].values, TOL.grad_rtol, TOL.grad_atol, name)


def test_padded_form_under_jit():
    params, state, x, dy, mask = case(GLU)
    j = be.from_numpy
    grads, _ = be.vjp(GLU, j(params), j(state), j(x), j(dy), True, j(mask), sparse=True)
    down = grads["experts.down"]
    size = be.sparse.capacity(GLU, mask.size)
    assert isinstance(down, be.RowSparse) and down.rows.shape == (size,) and down.values.shape == (size, 8)
    count = int(down.count)
    assert np.all(np.asarray(down.rows)[count:] == GLU.n_experts)
    assert not np.any(np.asarray(down.values)[count:])
    np.testing.assert_array_equal(np.asarray(down.densify(GLU.n_experts)), down.to_numpy().densify(GLU.n_experts))


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_sparse_must_be_a_bool(bad):
    params, state, x, dy, _ = case(GLU)
    j = be.from_numpy
    with pytest.raises(PEERInputError, match=rf"sparse={bad!r}, but expected a bool"):
        be.vjp(GLU, j(params), j(state), j(x), j(dy), sparse=bad)


def test_sharded_tables_refuse_sparse():
    from jax.sharding import NamedSharding, PartitionSpec

    params, state, x, dy, _ = case(GLU)
    mesh = jax.make_mesh((1,), ("model",))
    j = be.from_numpy
    sharded = {
        name: jax.device_put(value, NamedSharding(mesh, PartitionSpec(None, "model")))
        if name in ("experts.down", "experts.up")
        else value
        for name, value in j(params).items()
    }
    with pytest.raises(PEERConfigError, match="sparse=True with implementation='sharded'"):
        be.vjp(GLU, sharded, j(state), j(x), j(dy), sparse=True)


# ---------------------------------------------------------------------------- optax on rows


def sparse_grads(seed=0):
    params, state, x, dy, mask = case(GLU, seed=seed)
    j = be.from_numpy
    grads, _ = be.vjp(GLU, j(params), j(state), j(x), j(dy), True, j(mask), sparse=True)
    names = [n for n in peer_ref.EXPERT_TABLES if n in params]
    return {n: j(params[n]) for n in names}, {n: grads[n] for n in names}


def test_row_adam_is_lazy_adam_and_leaves_other_rows_alone():
    tables, grads = sparse_grads()
    before = {n: np.asarray(t, np.float64) for n, t in tables.items()}
    tx = optax.adam(0.1)
    state = tx.init(tables)
    expected = {n: v.copy() for n, v in before.items()}
    mu = {n: np.zeros_like(v) for n, v in before.items()}
    nu = {n: np.zeros_like(v) for n, v in before.items()}
    for step in (1, 2):
        tables, state = be.apply_row_updates(tx, tables, state, grads)
        for name, grad in be.to_numpy(grads).items():
            r, g = grad.rows, grad.values.astype(np.float64)
            mu[name][r] = 0.9 * mu[name][r] + 0.1 * g
            nu[name][r] = 0.999 * nu[name][r] + 0.001 * g**2
            expected[name][r] -= (
                0.1 * (mu[name][r] / (1 - 0.9**step)) / (np.sqrt(nu[name][r] / (1 - 0.999**step)) + 1e-8)
            )
            scaled_close(tables[name], expected[name], 1e-5, 1e-5, name)
            untouched = np.setdiff1d(np.arange(GLU.n_experts), r)
            np.testing.assert_array_equal(np.asarray(tables[name])[untouched], before[name][untouched])
            np.testing.assert_array_equal(np.asarray(state[0].mu[name])[untouched], 0)


def test_row_sgd_equals_dense_sgd():
    tables, grads = sparse_grads(seed=1)
    dense = {n: g.densify(GLU.n_experts) for n, g in grads.items()}
    tx = optax.sgd(0.5)
    expected = optax.apply_updates(tables, tx.update(dense, tx.init(tables), tables)[0])
    updated, _ = be.apply_row_updates(tx, dict(tables), tx.init(tables), grads)
    for name in tables:
        np.testing.assert_allclose(np.asarray(updated[name]), np.asarray(expected[name]), rtol=1e-6, atol=1e-7)


def test_the_tables_and_state_are_donated_and_updated_in_place():
    tables, grads = sparse_grads()
    tx = optax.adam(0.1)
    state = tx.init(tables)
    compiled = jax.jit(be.row_update, static_argnums=0, donate_argnums=(1, 2)).lower(tx, tables, state, grads)
    hlo = compiled.compile().as_text()
    n_tables = len(tables)
    # Every table and its two moments alias an output buffer (count too): nothing of size N*d is copied.
    aliased = hlo.split("input_output_alias={", 1)[1].split("}, entry", 1)[0]
    assert aliased.count("may-alias") >= 3 * n_tables
    new_tables, new_state = be.apply_row_updates(tx, tables, state, grads)
    assert all(t.is_deleted() for t in tables.values())
    assert all(m.is_deleted() for m in state[0].mu.values())
    assert not any(t.is_deleted() for t in new_tables.values())


def test_bad_row_updates_are_refused():
    tables, grads = sparse_grads()
    tx = optax.sgd(0.1)
    with pytest.raises(PEERInputError, match=r"grads\['experts.up'\] is ndarray, but expected a RowSparse"):
        be.apply_row_updates(tx, tables, tx.init(tables), {**grads, "experts.up": np.zeros((36, 8))})
    with pytest.raises(PEERInputError, match="does not have the tables' structure"):
        be.apply_row_updates(tx, tables, tx.init(tables), {"experts.up": grads["experts.up"]})
    factored = optax.adafactor(0.1, min_dim_size_to_factor=4)
    with pytest.raises(PEERConfigError, match="not shaped like the tables"):
        be.apply_row_updates(factored, tables, factored.init(tables), grads)


# ---------------------------------------------------------------------------- the NNX layer


class Twice(nnx.Module):
    """A model calling one PEER layer twice (the table gradients sum over calls) beside a Linear."""

    def __init__(self):
        self.lin = nnx.Linear(8, 8, rngs=nnx.Rngs(0))
        self.peer = be.PEER(GLU, rngs=nnx.Rngs(1))

    def __call__(self, x, mask):
        return self.peer(self.lin(x), mask=mask) + 0.5 * self.peer(x[:1])


def loss(model, x, mask):
    return jnp.sum(model(x, mask) ** 2)


def test_sparse_value_and_grad_equals_nnx_value_and_grad():
    params, state, x, dy, mask = case(GLU)
    sparse_step = nnx.jit(be.sparse_value_and_grad(loss))
    value, (grads, table_grads) = sparse_step(Twice(), jnp.asarray(x), jnp.asarray(mask))
    dense_value, dense = nnx.jit(nnx.value_and_grad(loss))(Twice(), jnp.asarray(x), jnp.asarray(mask))
    assert value == pytest.approx(float(dense_value), rel=1e-6)
    np.testing.assert_allclose(grads["lin"]["kernel"][...], dense["lin"]["kernel"][...], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads["peer"]["query"]["kernel"][...], dense["peer"]["query"]["kernel"][...], rtol=1e-5)
    assert set(nnx.to_flat_state(nnx.state(grads, be.ExpertTable))) == set()
    for name in ("down", "up", "gate", "bias"):
        sparse = table_grads["peer"]["experts"][name]
        assert isinstance(sparse, be.RowSparse)
        expected = np.asarray(dense["peer"]["experts"][name][...])
        scaled_close(sparse.densify(GLU.n_experts), expected, TOL.grad_rtol, TOL.grad_atol, name)
        rows = sparse.to_numpy().rows
        np.testing.assert_array_equal(np.flatnonzero(np.any(expected.reshape(GLU.n_experts, -1) != 0, axis=1)), rows)


def test_a_training_step_with_row_and_dense_optimizers_lowers_the_loss():
    params, state, x, dy, mask = case(GLU)
    x, mask = jnp.asarray(x), jnp.asarray(mask)
    model = Twice()
    dense_opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=be.DENSE_PARAMS)
    row_opt = be.RowOptimizer(model, optax.adam(1e-2))
    before = np.asarray(model.peer.experts.down[...])

    @nnx.jit(donate_argnums=(0, 1, 2))
    def step(model, dense_opt, row_opt):
        value, (grads, table_grads) = be.sparse_value_and_grad(loss)(model, x, mask)
        dense_opt.update(model, grads)
        row_opt.update(model, table_grads)
        return value, table_grads["peer"]["experts"]["down"]

    losses, touched = [], []
    for _ in range(3):
        value, down = step(model, dense_opt, row_opt)
        losses.append(float(value))
        touched.append(down.to_numpy().rows)
    assert losses[-1] < losses[0]
    untouched = np.setdiff1d(np.arange(GLU.n_experts), np.concatenate(touched))
    assert untouched.size
    np.testing.assert_array_equal(np.asarray(model.peer.experts.down[...])[untouched], before[untouched])
