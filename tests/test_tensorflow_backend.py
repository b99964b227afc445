"""TensorFlow backend specifics: compiled path, tie rule, errors.

Generic semantics are covered by the conformance suite; these tests pin down what only
this backend has (XLA tracing, TF's top_k tie order). The Keras layer has its own tests
(tests/test_keras_layer.py, run once per Keras backend).
"""

import ml_dtypes
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import peer_backends
import peer_ref
from peer_ref import PEERConfig, PEERInputError

be = peer_backends.get("tensorflow")
from peer_backends.tensorflow import experts as tf_experts
from peer_backends.tensorflow import peer as tf_peer
from peer_backends.tensorflow import routing as tf_routing

CFG = PEERConfig(d_model=8, n_experts=16, heads=2, topk=3, d_key=4)


def _numpy(tree):
    return be.to_numpy(tree)


def _reference(cfg, params, state, x, **kwargs):
    return peer_ref.forward(cfg, _numpy(params), _numpy(state), np.asarray(x), **kwargs)


def test_backend_attributes():
    assert be.name == "tensorflow" and be.version == tf.__version__
    assert {"float64", "float32", "bfloat16", "grad", "jit"} <= be.capabilities


def test_conversion_keeps_dtypes_and_bfloat16_maps_to_ml_dtypes():
    tree = {"a": np.ones((2, 3), ml_dtypes.bfloat16), "b": (np.arange(3), None), "c": [np.zeros(2, bool)]}
    tensors = be.from_numpy(tree)
    assert tensors["a"].dtype == tf.bfloat16 and tensors["b"][0].dtype == tf.int64 and tensors["b"][1] is None
    back = be.to_numpy({**tensors, "v": tf.Variable(tf.ones(2, tf.float64))})
    assert back["a"].dtype == ml_dtypes.bfloat16 and back["c"][0].dtype == np.bool_
    assert back["v"].dtype == np.float64


def test_init_follows_reference_distributions_and_is_seeded():
    cfg = PEERConfig(d_model=64, n_experts=1024, heads=2, topk=4, d_key=16, query_bias=True, expert_glu=True)
    params, state = be.init(cfg, seed=5)
    again, _ = be.init(cfg, seed=5)
    other, _ = be.init(cfg, seed=6)
    assert all(params[name].dtype == tf.float32 for name in params)
    assert np.array_equal(params["experts.down"].numpy(), again["experts.down"].numpy())
    assert not np.array_equal(params["experts.down"].numpy(), other["experts.down"].numpy())
    for name, std in peer_ref.init_std(cfg).items():
        assert np.std(params[name].numpy()) == pytest.approx(std, rel=0.1), name
    for name, value in peer_ref.init_constant(cfg).items():
        tree = params if name in params else state
        assert np.all(tree[name].numpy() == value), name


def test_compiled_equals_eager_forward_and_vjp():
    params, state = be.init(CFG, seed=1)
    rng = np.random.default_rng(1)
    x = be.from_numpy(rng.standard_normal((3, 4, CFG.d_model)).astype(np.float32))
    dy = be.from_numpy(rng.standard_normal((3, 4, CFG.d_out)).astype(np.float32))
    eager = be.apply(CFG, params, state, x, True, jit=False)
    compiled = be.apply(CFG, params, state, x, True, jit=True)
    for a, b in zip(_numpy(eager), _numpy(compiled)):
        for key in a if isinstance(a, dict) else [None]:
            pick = (lambda t, key=key: t[key]) if key else (lambda t: t)
            np.testing.assert_allclose(pick(a), pick(b), rtol=1e-5, atol=1e-6)
    (g_eager, dx_eager), (g_jit, dx_jit) = (be.vjp(CFG, params, state, x, dy, True, jit=j) for j in (False, None))
    np.testing.assert_allclose(dx_eager.numpy(), dx_jit.numpy(), rtol=1e-4, atol=1e-5)
    for name in CFG.param_shapes():
        np.testing.assert_allclose(g_eager[name].numpy(), g_jit[name].numpy(), rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("jit", [False, True])
def test_token_chunks_with_padding_match_the_reference(monkeypatch, jit):
    # Tiny chunks (3 tokens, the last one padded) so the chunked experts and their
    # recomputing custom gradient really loop; a config no other test compiles.
    cfg = PEERConfig(d_model=6, n_experts=16, heads=2, topk=2, d_key=4, d_out=5, activation="relu", expert_glu=True)
    monkeypatch.setattr(tf_experts, "CHUNK_ELEMENTS", 3 * cfg.heads * cfg.topk * cfg.d_model)
    params, state = be.init(cfg, seed=8, dtype="float64")
    rng = np.random.default_rng(8)
    x, dy = rng.standard_normal((10, cfg.d_model)), rng.standard_normal((10, cfg.d_out))
    mask = np.arange(10) != 4
    args = (be.from_numpy(x), be.from_numpy(dy), True, be.from_numpy(mask))
    y, _, _ = be.apply(cfg, params, state, args[0], *args[2:], jit=jit)
    grads, dx = be.vjp(cfg, params, state, *args, jit=jit)
    y_ref, _, _ = _reference(cfg, params, state, x, training=True, mask=mask)
    grads_ref, dx_ref = peer_ref.vjp(cfg, _numpy(params), _numpy(state), x, dy, training=True, mask=mask)
    np.testing.assert_allclose(y.numpy(), y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx.numpy(), dx_ref, rtol=1e-10, atol=1e-12)
    for name, value in grads_ref.items():
        np.testing.assert_allclose(grads[name].numpy(), value, rtol=1e-10, atol=1e-12, err_msg=name)


def test_compiled_path_traces_once_for_every_token_count():
    params, state = be.init(CFG, seed=2)
    rng = np.random.default_rng(2)
    for lead in [(4,), (2, 9), (0,), (17,)]:
        x = be.from_numpy(rng.standard_normal(lead + (CFG.d_model,)).astype(np.float32))
        y, _, aux = be.apply(CFG, params, state, x, False)
        assert tuple(y.shape) == lead + (CFG.d_out,) and tuple(aux["indices"].shape) == lead + (2, 3)
    fn = tf_peer._compiled_apply(CFG, False, False, False, "float32")
    assert fn.experimental_get_tracing_count() == 1
    variables = {name: tf.Variable(value) for name, value in params.items()}
    for tokens in (3, 6):
        x = be.from_numpy(rng.standard_normal((tokens, CFG.d_model)).astype(np.float32))
        grads, _ = be.vjp(CFG, variables, state, x, tf.ones((tokens, CFG.d_out)), False)
        assert set(grads) == set(CFG.param_shapes())
    assert tf_peer._compiled_vjp(CFG, False, False, False, "float32").experimental_get_tracing_count() == 1


def _tie_problem(dtype):
    """Integer-valued queries and keys: sub-key scores and their sums tie all the time."""
    cfg = PEERConfig(d_model=4, n_experts=36, heads=2, topk=4, d_key=4, shared_keys=False, query_norm="none")
    rng = np.random.default_rng(7)
    params, state = peer_ref.init(cfg, dtype=dtype)
    params["query.kernel"] = rng.integers(-1, 2, (4, 8)).astype(dtype)
    params["keys.left"] = rng.integers(-1, 2, (2, 6, 2)).astype(dtype)
    params["keys.right"] = rng.integers(-1, 2, (2, 6, 2)).astype(dtype)
    x = rng.integers(-2, 3, (300, 4)).astype(dtype)
    return cfg, params, state, x


@pytest.mark.parametrize("jit", [False, True])
def test_exact_ties_go_to_the_lower_index(jit):
    # Stage 1 relies on tf.math.top_k putting equal values lower position first.
    values = np.random.default_rng(0).integers(0, 3, (200, 64)).astype(np.float32)
    top = tf.function(lambda v: tf.math.top_k(v, 16).indices, jit_compile=jit)(tf.constant(values))
    order = np.lexsort((np.broadcast_to(np.arange(64), values.shape), -values), axis=-1)[:, :16]
    np.testing.assert_array_equal(top.numpy(), order)
    for dtype in ("float64", "float32"):
        cfg, params, state, x = _tie_problem(dtype)
        _, _, aux_ref = peer_ref.forward(cfg, params, state, x)
        _, _, aux = be.apply(cfg, be.from_numpy(params), be.from_numpy(state), be.from_numpy(x), jit=jit)
        np.testing.assert_array_equal(aux["indices"].numpy(), aux_ref["indices"])


@pytest.mark.parametrize("jit", [False, True])
def test_signed_zero_and_nan_scores_order_like_the_reference(jit):
    # XLA orders +0 above -0 and NaN first; the reference treats +-0 as a tie and NaN as lowest.
    scores = tf.constant([[[0.0, -0.0, np.nan, 1.0, -0.0, 0.0]]])
    top = tf.function(lambda s: tf.math.top_k(tf_routing._orderable(s), 6).indices, jit_compile=jit)(scores)
    np.testing.assert_array_equal(top.numpy(), [[[3, 0, 1, 4, 5, 2]]])


def test_zero_tokens_and_all_masked_training_keep_state():
    params, state = be.init(CFG, seed=5)
    x = be.from_numpy(np.full((2, 3, CFG.d_model), np.nan, np.float32))
    y, new_state, _ = be.apply(CFG, params, state, x, True, be.from_numpy(np.zeros((2, 3), bool)))
    assert np.array_equal(y.numpy(), np.zeros((2, 3, CFG.d_out)))
    y, empty_state, aux = be.apply(CFG, params, state, tf.zeros((0, CFG.d_model)), True)
    assert y.shape == (0, CFG.d_out) and aux["indices"].shape == (0, 2, 3)
    grads, dx = be.vjp(CFG, params, state, tf.zeros((0, CFG.d_model)), tf.zeros((0, CFG.d_out)), True)
    assert dx.shape == (0, CFG.d_model) and not np.any(grads["experts.down"].numpy())
    for name in state:
        assert np.array_equal(new_state[name].numpy(), state[name].numpy())
        assert np.array_equal(empty_state[name].numpy(), state[name].numpy())


def test_bfloat16_stores_bfloat16_and_computes_in_float32():
    params, state = be.init(CFG, seed=6, dtype="bfloat16")
    assert state["query_norm.mean"].dtype == tf.float32
    x = np.random.default_rng(6).standard_normal((6, CFG.d_model)).astype(ml_dtypes.bfloat16)
    y, new_state, aux = be.apply(CFG, params, state, be.from_numpy(x), True)
    grads, dx = be.vjp(CFG, params, state, be.from_numpy(x), be.from_numpy(np.ones((6, 8), ml_dtypes.bfloat16)))
    assert y.dtype == dx.dtype == tf.bfloat16 and aux["scores"].dtype == tf.float32
    assert all(g.dtype == tf.bfloat16 for g in grads.values())

    def as64(tree):
        return {k: np.asarray(v, np.float64) for k, v in _numpy(tree).items()}

    y_ref, _, _ = peer_ref.forward(CFG, as64(params), as64(state), x.astype(np.float64), training=True)
    np.testing.assert_allclose(y.numpy().astype(np.float64), y_ref, rtol=2e-2, atol=2e-2)


def _bad_calls():
    params, state = peer_ref.init(CFG, dtype="float32")
    x = np.zeros((2, CFG.d_model), np.float32)
    missing = {k: v for k, v in params.items() if k != "experts.up"}
    return {
        "x dtype": (params, state, x.astype(np.float64), {}),
        "x width": (params, state, np.zeros((2, 5), np.float32), {}),
        "training": (params, state, x, {"training": 1}),
        "mask dtype": (params, state, x, {"mask": np.ones(2, np.int32)}),
        "mask shape": (params, state, x, {"mask": np.ones(3, bool)}),
        "routing range": (params, state, x, {"routing": np.full((2, 2, 3), 16)}),
        "routing shape": (params, state, x, {"routing": np.zeros((2, 3), np.int64)}),
        "params names": (missing, state, x, {}),
        "state dtype": (params, {k: v.astype(np.float64) for k, v in state.items()}, x, {}),
    }


@pytest.mark.parametrize("case", sorted(_bad_calls()))
def test_bad_inputs_raise_the_reference_error(case):
    params, state, x, kwargs = _bad_calls()[case]
    with pytest.raises(PEERInputError) as want:
        peer_ref.forward(CFG, params, state, x, **kwargs)
    arrays = {k: be.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
    with pytest.raises(PEERInputError) as got:
        be.apply(CFG, be.from_numpy(params), be.from_numpy(state), be.from_numpy(x), **arrays)
    assert str(got.value) == str(want.value)


def test_largest_expert_count_routes_to_exact_indices():
    """SPEC §1: N <= 46340**2 keeps every expert index inside int32, tf.math.top_k's index dtype.
    The best sub-keys last on both sides give the largest indices; the runner-up is an exact tie,
    which goes to the lower expert index (SPEC §4.1)."""
    cfg = PEERConfig(d_model=2, n_experts=peer_ref.MAX_N_KEYS**2, heads=1, topk=2, d_key=2)
    scores = np.arange(cfg.n_keys, dtype=np.float64).reshape(1, 1, -1)
    expected = peer_ref.product_key_topk(cfg, scores, scores)
    assert expected.tolist() == [[[46339 * 46340 + 46339, 46338 * 46340 + 46339]]]
    for dtype in (tf.float32, tf.float64):
        s = tf.constant(scores, dtype=dtype)
        got = tf.function(lambda a: tf_routing._product_key_topk(cfg, a, a), jit_compile=True)(s)
        assert got.numpy().tolist() == expected.tolist(), f"{dtype}: got {got.numpy().tolist()}"


def test_float32_means_float32_tensorfloat32_is_switched_off():
    """SPEC §10.1: TensorFlow's process-wide TF32 switch is off once the backend has run (on GPUs
    from Ampere on it would round float32 matrix products to a 10-bit mantissa)."""
    tf.config.experimental.enable_tensor_float_32_execution(True)
    params, state = be.init(CFG, seed=0)
    be.apply(CFG, params, state, tf.zeros((2, CFG.d_model)))
    assert not tf.config.experimental.tensor_float_32_execution_enabled()
    tf.config.experimental.enable_tensor_float_32_execution(True)
    be.layer(CFG)(np.zeros((2, CFG.d_model), np.float32))
    assert not tf.config.experimental.tensor_float_32_execution_enabled()


def test_the_package_exports_its_layer_as_peer():
    from peer_backends.keras import PEER as keras_peer
    from peer_backends.tensorflow import PEER

    assert PEER is be.layer is keras_peer and issubclass(PEER, keras.layers.Layer)


def test_every_role_has_its_name(unresolved_roles):
    """peer_backends.contract.ROLES is true of this backend: one name per role in every backend."""
    assert unresolved_roles("tensorflow") == []


# ---------------------------------------------------------------------------- row-sparse gradients (SPEC §7.1)

SPARSE_GLU = PEERConfig(d_model=8, n_experts=36, heads=2, topk=3, d_key=4, expert_glu=True, expert_bias=True)


def _sparse_case(seed=0, dtype="float32"):
    rng = np.random.default_rng(seed)
    params, state = peer_ref.init(SPARSE_GLU, seed=seed, dtype="float32")
    x = rng.standard_normal((3, 4, 8)).astype(dtype)
    dy = rng.standard_normal((3, 4, 8)).astype(dtype)
    mask = np.array([[True, False, True, True], [True, True, False, True], [False, True, True, True]])
    return params, state, x, dy, mask


def _check_sparse(params, state, x, dy, mask, routing=None, compute_dtype=None, jit=None):
    """vjp(sparse=True): IndexedSlices whose rows are the reference's for the backend's routing and
    whose values are the dense gradient's rows; to_numpy gives peer_ref.RowSparse."""
    cfg, t = SPARSE_GLU, be.from_numpy
    args = (cfg, t(params), t(state), t(x), t(dy), True, None if mask is None else t(mask))
    opts = {"routing": None if routing is None else t(routing), "compute_dtype": compute_dtype}
    grads, dx = be.vjp(*args, sparse=True, jit=jit, **opts)
    dense, dx_dense = _numpy(be.vjp(*args, **opts))
    _, _, aux = be.apply(*args[:4], True, args[6], **opts)
    indices = aux["indices"].numpy()
    reference, _ = peer_ref.vjp(
        cfg, params, state, x, dy, True, mask, routing=indices, compute_dtype=compute_dtype, sparse=True
    )
    tol = peer_ref.TOLERANCES[compute_dtype or "float32"]
    np.testing.assert_allclose(dx.numpy().astype(np.float64), dx_dense.astype(np.float64), rtol=1e-6, atol=1e-6)
    rows = peer_ref.gradient_rows(indices, np.ones(indices.shape[:-2], bool) if mask is None else mask)
    for name, grad in grads.items():
        if name not in peer_ref.EXPERT_TABLES:
            np.testing.assert_allclose(grad.numpy(), dense[name], rtol=1e-6, atol=1e-6)
            continue
        assert isinstance(grad, tf.IndexedSlices) and grad.indices.dtype == tf.int64
        sparse = _numpy(grad)
        assert isinstance(sparse, peer_ref.RowSparse) and sparse.values.dtype == np.float32
        np.testing.assert_array_equal(sparse.rows, rows)
        np.testing.assert_array_equal(sparse.rows, reference[name].rows)
        np.testing.assert_allclose(sparse.densify(cfg.n_experts), dense[name], rtol=1e-5, atol=1e-6)
        scale = max(1.0, np.abs(reference[name].values).max(initial=0.0))
        assert np.all(np.abs(sparse.values - reference[name].values) <= tol.grad_atol * scale), name
    return grads


@pytest.mark.parametrize("jit", [None, False], ids=["graph", "eager"])
def test_sparse_table_gradients_are_indexed_slices_of_the_dense_rows(jit):
    _check_sparse(*_sparse_case(), jit=jit)


def test_sparse_with_a_routing_override_lists_repeated_experts_once_and_masked_ones_not():
    params, state, x, dy, mask = _sparse_case(seed=1)
    routing = np.zeros((3, 4, 2, 3), np.int64)
    routing[..., 0, :] = [5, 5, 7]
    routing[..., 1, :] = [35, 7, 0]
    routing[~mask] = 20
    grads = _check_sparse(params, state, x, dy, mask, routing=routing)
    np.testing.assert_array_equal(grads["experts.up"].indices.numpy(), [0, 5, 7, 35])


def test_sparse_in_the_mixed_mode_and_with_no_valid_token():
    params, state, x, dy, mask = _sparse_case(seed=2)
    low = ml_dtypes.bfloat16
    _check_sparse(params, state, x.astype(low), dy.astype(low), mask, compute_dtype="bfloat16")
    grads = _check_sparse(params, state, x, dy, np.zeros_like(mask))
    assert grads["experts.down"].values.shape == (0, 8)


def test_sparse_refuses_xla_and_non_bools():
    params, state, x, dy, _ = _sparse_case()
    t = be.from_numpy
    args = (SPARSE_GLU, t(params), t(state), t(x), t(dy))
    with pytest.raises(peer_ref.PEERConfigError, match="jit=True with sparse=True"):
        be.vjp(*args, sparse=True, jit=True)
    with pytest.raises(PEERInputError, match="sparse='yes', but expected a bool"):
        be.vjp(*args, sparse="yes")


def test_keras_layer_sparse_gradients_reach_the_optimizer_as_indexed_slices():
    from peer_backends.keras import PEER

    sparse, dense = PEER(SPARSE_GLU, seed=0, sparse=True), PEER(SPARSE_GLU, seed=0)
    x, mask = tf.random.stateless_normal((3, 4, 8), seed=(0, 1)), tf.constant(_sparse_case()[4])
    grads = []
    for layer in (sparse, dense):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x, training=True, mask=mask) ** 2)
        grads.append(tape.gradient(loss, layer.trainable_weights))
    for weight, g_sparse, g_dense in zip(sparse.trainable_weights, *grads):
        table = weight.path.split("/", 1)[1].replace("/", ".") in peer_ref.EXPERT_TABLES
        assert isinstance(g_sparse, tf.IndexedSlices) == table, weight.path
        np.testing.assert_allclose(tf.convert_to_tensor(g_sparse), tf.convert_to_tensor(g_dense), rtol=1e-5, atol=1e-6)
    # Plain SGD applies them as a scatter: rows no valid token selected do not move.
    rows = grads[0][[w.path for w in sparse.trainable_weights].index(f"{sparse.name}/experts/down")].indices.numpy()
    before = {w.path: w.numpy() for w in sparse.trainable_weights}
    keras.optimizers.SGD(0.1).apply_gradients(zip(grads[0], sparse.trainable_weights))
    down = {w.path: w for w in sparse.trainable_weights}[f"{sparse.name}/experts/down"]
    untouched = np.setdiff1d(np.arange(SPARSE_GLU.n_experts), rows)
    np.testing.assert_array_equal(down.numpy()[untouched], before[down.path][untouched])
    assert not np.array_equal(down.numpy()[rows], before[down.path][rows])


def test_keras_sparse_layer_trains_without_xla_and_refuses_xla():
    from peer_backends.keras import PEER

    model = keras.Sequential([keras.Input((8,)), PEER(SPARSE_GLU, seed=0, sparse=True)])
    x = np.random.default_rng(0).standard_normal((16, 8)).astype("float32")
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse", jit_compile=False)
    losses = [float(model.train_on_batch(x, np.zeros_like(x))) for _ in range(3)]
    assert losses[-1] < losses[0]
    assert PEER.from_config(model.layers[0].get_config()).sparse is True
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=True)
    with pytest.raises(peer_ref.PEERConfigError, match="sparse=True inside an XLA-compiled function"):
        model.train_on_batch(x, np.zeros_like(x))


@pytest.mark.parametrize(
    "make, sparse",
    [
        (lambda: keras.optimizers.SGD(0.1), True),
        (lambda: keras.optimizers.Adagrad(0.1), True),
        (lambda: keras.optimizers.Adam(0.1), False),
    ],
    ids=["SGD", "Adagrad", "Adam"],
)
def test_which_keras_optimizers_apply_indexed_slices_as_scatters(make, sparse):
    # What the Keras page documents: SGD and Adagrad scatter the rows; Adam densifies (its moments
    # decay on every row, its own dense semantics).
    variable = keras.Variable(tf.zeros((64, 8)))
    optimizer = make()
    optimizer.build([variable])

    @tf.function
    def step(values, indices):
        optimizer.apply_gradients([(tf.IndexedSlices(values, indices, tf.constant([64, 8], tf.int64)), variable)])

    graph = step.get_concrete_function(tf.TensorSpec((None, 8)), tf.TensorSpec((None,), tf.int64)).graph
    kinds = {op.type for op in graph.get_operations()}
    assert any(kind.startswith("ResourceScatter") for kind in kinds) == sparse
    assert ("UnsortedSegmentSum" in kinds) != sparse
