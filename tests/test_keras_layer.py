"""The Keras 3 layer under the Keras backend this process runs (``KERAS_BACKEND``).

CI runs this file three times, once per Keras backend (tensorflow, jax, torch), each in a
process of its own: Keras picks its backend once, at import. The layer must train with
``fit``, save and load, follow the dtype policy, ``trainable=False`` and Keras's seeding on
each, computing with this project's backend for that framework.
"""

import sys

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import peer_backends
import peer_ref
from peer_backends.keras import PEER
from peer_backends.keras.layer import COMPUTE
from peer_ref import PEERConfig, PEERConfigError, PEERInputError

BACKEND = keras.backend.backend()
if BACKEND not in COMPUTE:
    pytest.skip(f"KERAS_BACKEND={BACKEND!r}: the layer runs on {sorted(COMPUTE)}", allow_module_level=True)
be = peer_backends.get(COMPUTE[BACKEND])

CFG = PEERConfig(d_model=8, n_experts=16, heads=2, topk=3, d_key=4)
GLU = PEERConfig(d_model=8, n_experts=16, heads=2, topk=3, d_key=4, expert_glu=True, query_bias=True)


def _numpy(tree):
    return (
        {k: keras.ops.convert_to_numpy(v) for k, v in tree.items()}
        if isinstance(tree, dict)
        else keras.ops.convert_to_numpy(tree)
    )


def _data(seed, lead=(4, 5), cfg=CFG):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(lead + (cfg.d_model,)).astype(np.float32), rng.random(lead) < 0.7


def _model(layer, cfg=CFG, **compile_kwargs):
    model = keras.Sequential([keras.Input((5, cfg.d_model)), layer, keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse", **compile_kwargs)
    return model


def test_peer_backends_layer_builds_it():
    assert type(peer_backends.layer(CFG, backend="keras")) is PEER
    assert keras.saving.get_registered_name(PEER) == "peer>PEER"


def test_weight_paths_are_the_canonical_names():
    layer = PEER(GLU, name="peer_block")
    assert {w.path for w in layer.trainable_weights} == {
        f"peer_block/{n.replace('.', '/')}" for n in GLU.param_shapes()
    }
    assert {w.path for w in layer.non_trainable_weights} == {
        f"peer_block/{n.replace('.', '/')}" for n in GLU.state_shapes()
    }
    params, state = layer.params_and_state()
    assert {k: tuple(v.shape) for k, v in params.items()} == GLU.param_shapes()
    assert {k: tuple(v.shape) for k, v in state.items()} == GLU.state_shapes()
    text = repr(layer)
    assert "experts.down: (16, 8) float32" in text and "expert_glu=True" in text and "seed=None" in text


def test_call_equals_the_reference_and_updates_the_statistics():
    layer = PEER(GLU, seed=3)
    params, state = _numpy(layer.params_and_state()[0]), _numpy(layer.params_and_state()[1])
    x, mask = _data(0)
    y, aux = layer(x, training=True, mask=mask, return_aux=True)

    def wide(tree):
        return {k: v.astype(np.float64) for k, v in tree.items()}

    y_ref, state_ref, aux_ref = peer_ref.forward(
        GLU, wide(params), wide(state), x.astype(np.float64), training=True, mask=mask
    )
    np.testing.assert_allclose(_numpy(y), y_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(_numpy(aux["indices"]), aux_ref["indices"])
    np.testing.assert_allclose(_numpy(aux["weights"]), aux_ref["weights"], rtol=1e-5, atol=1e-6)
    for name, value in _numpy(layer.params_and_state()[1]).items():
        np.testing.assert_allclose(value, state_ref[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # Inference leaves the statistics alone; Keras's mask is passed on; loading is exact.
    before = _numpy(layer.params_and_state()[1])
    layer(x, training=False, mask=mask)
    assert all(np.array_equal(before[k], v) for k, v in _numpy(layer.params_and_state()[1]).items())
    assert layer.compute_mask(x, mask) is mask
    layer.load_params_and_state(params, state)
    assert all(np.array_equal(state[k], v) for k, v in _numpy(layer.params_and_state()[1]).items())


def test_return_aux_in_a_functional_model():
    layer = PEER(CFG, seed=1)
    inputs = keras.Input((5, CFG.d_model))
    y, aux = layer(inputs, return_aux=True)
    assert tuple(aux["indices"].shape) == (None, 5, CFG.heads, CFG.topk)
    model = keras.Model(inputs, [y, aux["indices"]])
    x, _ = _data(1)
    y_model, indices = model(x)
    y_eager, aux_eager = layer(x, return_aux=True)
    np.testing.assert_array_equal(_numpy(indices), _numpy(aux_eager["indices"]))
    np.testing.assert_allclose(_numpy(y_model), _numpy(y_eager), rtol=1e-6, atol=1e-7)


def test_fit_reduces_the_loss_and_updates_the_statistics():
    layer = PEER(CFG, seed=4)
    model = _model(layer)
    x, _ = _data(4, (16, 5))
    before = _numpy(layer.params_and_state()[1])
    history = model.fit(x, np.tanh(x[..., :1]), batch_size=8, epochs=2, verbose=0)
    assert history.history["loss"][1] < history.history["loss"][0]
    after = _numpy(layer.params_and_state()[1])
    assert all(not np.allclose(after[name], before[name]) for name in before)


def test_a_fit_step_applies_the_functional_gradients():
    """One SGD step of fit on mean squared error moves each weight by -lr times the functional
    vjp's gradient: Keras differentiates through the computing backend."""
    layer = PEER(GLU, seed=5)
    model = keras.Sequential([keras.Input((5, GLU.d_model)), layer])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x, _ = _data(5, (4, 5), GLU)
    target = np.tanh(x)
    params, state = layer.params_and_state()
    y, _, _ = be.apply(GLU, params, state, keras.ops.convert_to_tensor(x), True)
    dy = 2 * (_numpy(y) - target) / target.size  # the gradient of Keras's mean squared error
    grads, _ = be.vjp(GLU, params, state, keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(dy), True)
    model.fit(x, target, batch_size=4, epochs=1, shuffle=False, verbose=0)
    after = _numpy(layer.params_and_state()[0])
    for name, value in _numpy(params).items():
        np.testing.assert_allclose(after[name], value - 0.1 * _numpy(grads[name]), rtol=1e-4, atol=1e-6, err_msg=name)


def test_frozen_layer_runs_in_inference_mode_like_batch_normalization():
    x, mask = _data(9)
    layer = PEER(CFG, seed=2)
    layer(x, training=True, mask=mask)  # statistics away from their initial values
    layer.trainable = False
    before = _numpy(layer.params_and_state()[1])
    y_frozen = layer(x, training=True, mask=mask)
    assert all(np.array_equal(before[k], v) for k, v in _numpy(layer.params_and_state()[1]).items())
    assert np.array_equal(_numpy(y_frozen), _numpy(layer(x, training=False, mask=mask)))
    model = _model(layer)
    weights = [_numpy(w) for w in layer.weights]
    model.fit(x, np.tanh(x[..., :1]), batch_size=4, epochs=1, verbose=0)
    assert all(np.array_equal(a, _numpy(w)) for a, w in zip(weights, layer.weights))


def test_keras_file_round_trip_is_bit_exact(tmp_path):
    x, _ = _data(3)
    layer = PEER(GLU, name="peer_block", implementation=be.implementations[0])
    model = _model(layer, GLU)
    model(x, training=True)  # moves the statistics, so they must be saved to match
    layer.trainable = False
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    again = loaded.get_layer("peer_block")
    assert type(again) is PEER and again.cfg == GLU and not again.trainable
    assert again.implementation == be.implementations[0]
    assert [w.path for w in again.weights] == [w.path for w in layer.weights]
    assert all(np.array_equal(_numpy(a), _numpy(b)) for a, b in zip(model.weights, loaded.weights))
    assert np.array_equal(_numpy(loaded(x, training=False)), _numpy(model(x, training=False)))


def test_dtype_policy_bfloat16_and_the_global_policy():
    x, _ = _data(8)
    layer = PEER(CFG, seed=5, dtype=keras.DTypePolicy("bfloat16"))
    assert {w.dtype for w in layer.trainable_weights} == {"bfloat16"}
    assert {w.dtype for w in layer.non_trainable_weights} == {"float32"}  # SPEC §10.1
    assert keras.backend.standardize_dtype(layer(x).dtype) == "bfloat16"
    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float16")
    try:
        assert {w.dtype for w in PEER(CFG).trainable_weights} == {"float16"}
    finally:
        keras.config.set_dtype_policy(before)


@pytest.mark.parametrize("training", [False, True])
def test_mixed_bfloat16_policy_runs_the_mixed_mode(training):
    x, mask = _data(10)
    layer = PEER(CFG, seed=6, dtype="mixed_bfloat16")
    assert {w.dtype for w in layer.weights} == {"float32"} and layer.compute_dtype == "bfloat16"
    params, state = layer.params_and_state()
    y = layer(x, training=training, mask=mask)
    x_low = keras.ops.cast(x, "bfloat16")
    want, new_state, _ = be.apply(
        CFG, params, state, x_low, training, keras.ops.convert_to_tensor(mask), compute_dtype="bfloat16"
    )
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    np.testing.assert_allclose(
        _numpy(keras.ops.cast(y, "float32")), _numpy(keras.ops.cast(want, "float32")), rtol=2e-2, atol=2e-2
    )  # the functional call may run compiled
    for k, v in _numpy(layer.params_and_state()[1]).items():
        np.testing.assert_allclose(v, _numpy(new_state[k]), rtol=1e-5, atol=1e-6)


def test_mixed_policy_trains_float32_weights():
    layer = PEER(CFG, seed=7, dtype="mixed_bfloat16")
    x, _ = _data(11, (16, 5))
    history = _model(layer).fit(x, np.tanh(x[..., :1]), batch_size=8, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"])) and {w.dtype for w in layer.weights} == {"float32"}


def test_seeding_follows_keras_and_an_explicit_seed_gives_the_reference_tables():
    keras.utils.set_random_seed(1)
    first, second = PEER(CFG), PEER(CFG)
    keras.utils.set_random_seed(1)
    again = PEER(CFG)

    def down(layer):
        return _numpy(layer.params_and_state()[0]["experts.down"])

    assert not np.array_equal(down(first), down(second))
    assert np.array_equal(down(first), down(again))
    np.testing.assert_allclose(np.std(down(first)), CFG.d_model**-0.5, rtol=0.3)
    params, state = peer_ref.init(GLU, seed=3, dtype="float32")
    seeded = PEER(GLU, seed=3)
    for name, value in {**_numpy(seeded.params_and_state()[0]), **_numpy(seeded.params_and_state()[1])}.items():
        assert np.array_equal(value, {**params, **state}[name]), name
    assert PEER.from_config(seeded.get_config()).seed == 3
    with pytest.raises(PEERConfigError, match=r"seed=-1, but expected None .* or an int >= 0"):
        PEER(CFG, seed=-1)


def test_implementation_is_the_computing_backends():
    for name in be.implementations:
        assert PEER(CFG, implementation=name).implementation == name
    with pytest.raises(PEERConfigError, match=rf"implementation='cuda', but backend '{BACKEND}' has"):
        PEER(CFG, implementation="cuda")


def test_sparse_table_gradients_only_under_tensorflow():
    with pytest.raises(PEERInputError, match="sparse='yes', but expected a bool"):
        PEER(CFG, sparse="yes")
    if BACKEND == "tensorflow":
        assert PEER(CFG, sparse=True).sparse  # its gradients: tests/test_tensorflow_backend.py
    else:
        with pytest.raises(PEERConfigError, match=f"sparse=True under KERAS_BACKEND='{BACKEND}'"):
            PEER(CFG, sparse=True)


def test_errors_name_the_dtype_policy():
    layer = PEER(CFG, seed=0)
    with pytest.raises(PEERInputError, match=r"x.dtype=int32, .*dtype policy 'float32'") as info:
        layer(np.zeros((2, CFG.d_model), np.int32))
    assert "compute_dtype=" not in str(info.value)
    with pytest.raises(PEERInputError, match="mask.shape"):
        layer(np.zeros((2, 3, CFG.d_model), np.float32), mask=np.ones((2, 4), bool))


def test_only_the_computing_backend_is_imported():
    PEER(CFG)
    others = set(COMPUTE.values()) - {COMPUTE[BACKEND]}
    assert COMPUTE[BACKEND] in sys.modules and not others & set(sys.modules)


def test_a_keras_backend_without_a_peer_backend_is_refused(monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "numpy")
    with pytest.raises(
        PEERConfigError,
        match=r"keras.backend.backend\(\)='numpy', but the PEER Keras layer runs on "
        r"\['jax', 'tensorflow', 'torch'\] \(set KERAS_BACKEND",
    ):
        PEER(CFG)


ISSUE_23 = PEERConfig(d_model=2, n_experts=1, heads=1, topk=1, d_key=2)
STEP_X = np.array([[1.0, 0.0], [0.0, 3.0]], dtype=np.float32)
RECOMPUTATIONS = {
    "tensorflow": ["plain", "tf.recompute_grad", "tf.recompute_grad in tf.function", "keras.remat"],
    "torch": ["plain", "reentrant", "non-reentrant", "keras.remat"],
    "jax": ["plain", "jax.checkpoint", "keras.remat"],
}[BACKEND]


def _train_step(layer, x, recompute):
    """One training step's gradient of sum(layer(x)) with the layer's call recomputed as named."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        call = (
            (lambda x: layer(x, training=True))
            if recompute == "plain"
            else keras.remat(lambda x: layer(x, training=True))
            if recompute == "keras.remat"
            else tf.recompute_grad(lambda x: layer(x, training=True))
        )

        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = call(x)
            return tape.gradient(y, x)

        return (tf.function(step) if "tf.function" in recompute else step)(tf.constant(x))
    if BACKEND == "torch":
        import torch
        from torch.utils.checkpoint import checkpoint

        xt = torch.from_numpy(x).requires_grad_()
        if recompute == "plain":
            y = layer(xt, training=True)
        elif recompute == "keras.remat":
            y = keras.remat(lambda x: layer(x, training=True))(xt)
        else:
            y = checkpoint(lambda x: layer(x, training=True), xt, use_reentrant=recompute == "reentrant")
        y.sum().backward()
        return xt.grad
    import jax

    trainable = [v.value for v in layer.trainable_variables]
    fixed = [v.value for v in layer.non_trainable_variables]

    def loss(x):
        y, new_fixed = layer.stateless_call(trainable, fixed, x, training=True)
        return y.sum(), new_fixed

    wrapped = {"plain": loss, "jax.checkpoint": jax.checkpoint(loss), "keras.remat": keras.remat(loss)}[recompute]
    dx, new_fixed = jax.grad(wrapped, has_aux=True)(x)
    for variable, value in zip(layer.non_trainable_variables, new_fixed):
        variable.assign(value)
    return dx


@pytest.mark.parametrize("recompute", RECOMPUTATIONS)
def test_recomputation_updates_the_statistics_once(recompute):
    # SPEC §3.3: one training step under activation checkpointing updates the statistics once.
    params, state = peer_ref.init(ISSUE_23, seed=0, dtype="float32")
    layer = PEER(ISSUE_23, seed=0)
    dx = _train_step(layer, STEP_X, recompute)
    expected = peer_ref.forward(ISSUE_23, params, state, STEP_X, True)[1]
    np.testing.assert_allclose(expected["query_norm.mean"], [0.0724, 0.0065], atol=5e-5)
    got = _numpy(layer.params_and_state()[1])
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-7)
    ref_dx = peer_ref.vjp(ISSUE_23, params, state, STEP_X, np.ones((2, 2), np.float32), True)[1]
    np.testing.assert_allclose(_numpy(dx), ref_dx, rtol=1e-4, atol=1e-6)
