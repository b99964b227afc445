"""The JAX backend against the reference: functional API, flax.nnx module, jit, ties, errors."""

import re

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")
optax = pytest.importorskip("optax")

import jax.numpy as jnp

import peer_ref
from peer_backends import jax as be
from peer_ref.errors import PEERConfigError, PEERInputError

SMALL = peer_ref.PEERConfig(d_model=12, n_experts=64, heads=3, topk=4, d_key=6, d_out=5)
# heads * topk = 128 makes the expert chunks 256 tokens, so 300 tokens take the chunked, padded path.
CHUNKED = peer_ref.PEERConfig(
    d_model=8,
    n_experts=256,
    heads=8,
    topk=16,
    d_key=4,
    shared_keys=False,
    query_bias=True,
    activation="silu",
    score="sigmoid",
    expert_glu=True,
)
CHUNKED_TOKENS = (3, 100)


def case(cfg, dtype, tokens=(4, 25), seed=0):
    rng = np.random.default_rng(seed)
    params, state = peer_ref.init(cfg, seed=seed, dtype=dtype)
    x = rng.standard_normal(tokens + (cfg.d_model,)).astype(dtype)
    mask = rng.random(tokens) > 0.25
    dy = rng.standard_normal(tokens + (cfg.d_out,)).astype(dtype)
    return params, state, x, mask, dy


def assert_close(actual, expected, tol, what):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    err = np.max(np.abs(actual - expected), initial=0.0)
    assert err <= tol * max(1.0, np.max(np.abs(expected), initial=0.0)), f"{what}: max error {err}"


def compare_with_reference(cfg, dtype, tol, grad_tol, jit):
    params, state, x, mask, dy = case(cfg, dtype, tokens=CHUNKED_TOKENS if cfg is CHUNKED else (4, 25))
    j = be.from_numpy
    for training in (False, True):
        y, new_state, aux = peer_ref.forward(cfg, params, state, x, training, mask)
        grads, dx = peer_ref.vjp(cfg, params, state, x, dy, training, mask)
        yj, new_state_j, aux_j = be.to_numpy(be.apply(cfg, j(params), j(state), j(x), training, j(mask), jit=jit))
        grads_j, dx_j = be.to_numpy(be.vjp(cfg, j(params), j(state), j(x), j(dy), training, j(mask), jit=jit))
        assert yj.dtype == np.dtype(dtype) and dx_j.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(aux_j["indices"], aux["indices"])
        assert_close(yj, y, tol, f"y (training={training})")
        assert_close(dx_j, dx, grad_tol, f"dx (training={training})")
        for name in params:
            assert_close(grads_j[name], grads[name], grad_tol, f"grads[{name!r}] (training={training})")
        for name in state:
            assert_close(new_state_j[name], new_state[name], tol, f"state[{name!r}] (training={training})")


@pytest.mark.parametrize("cfg", [SMALL, CHUNKED], ids=["small", "chunked"])
def test_functional_matches_reference_float32(cfg):
    compare_with_reference(cfg, "float32", 1e-5, 1e-4, jit=None)


@pytest.mark.parametrize("cfg", [SMALL, CHUNKED], ids=["small", "chunked"])
def test_functional_matches_reference_float64(cfg, x64):
    compare_with_reference(cfg, "float64", 1e-12, 1e-11, jit=None)


def test_chunked_config_really_spans_several_chunks():
    tokens = int(np.prod(CHUNKED_TOKENS))
    assert tokens > be.experts.ROWS_PER_CHUNK // (CHUNKED.heads * CHUNKED.topk)  # more than one chunk
    assert tokens % (be.experts.ROWS_PER_CHUNK // (CHUNKED.heads * CHUNKED.topk))  # and a padded last one


def test_eager_path_equals_jit_path():
    params, state, x, mask, dy = case(CHUNKED, "float32", tokens=CHUNKED_TOKENS)
    j = be.from_numpy
    args = (CHUNKED, j(params), j(state), j(x), True, j(mask))
    compiled, eager = be.apply(*args, jit=True), be.apply(*args, jit=False)
    for got, want in zip(jax.tree.leaves(eager), jax.tree.leaves(compiled)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    args = (CHUNKED, j(params), j(state), j(x), j(dy), True, j(mask))
    with jax.disable_jit():
        eager = be.vjp(*args, jit=False)
    for got, want in zip(jax.tree.leaves(eager), jax.tree.leaves(be.vjp(*args))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_bfloat16_computes_in_float32_and_rounds_once():
    params, state, x, mask, _ = case(SMALL, "float32")

    def bf16(tree):
        return jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), be.from_numpy(tree))

    params_bf, x_bf = bf16(params), bf16(x)
    y, new_state, aux = be.apply(SMALL, params_bf, be.from_numpy(state), x_bf, True, be.from_numpy(mask))
    assert y.dtype == jnp.bfloat16 and aux["weights"].dtype == jnp.float32
    assert new_state["query_norm.mean"].dtype == jnp.float32

    def widened(tree):
        return jax.tree.map(lambda a: np.asarray(a, np.float32), tree)

    y_ref, _, _ = peer_ref.forward(SMALL, widened(params_bf), state, widened(x_bf), True, mask)
    assert_close(y.astype(jnp.float32), y_ref, 2e-2, "bfloat16 y")


def test_exact_ties_follow_the_lower_index_rule():
    # Integer-valued queries and keys make many sums exactly equal, in both stages;
    # signed zeros (0 * negative key) must tie with +0 too.
    cfg = peer_ref.PEERConfig(d_model=4, n_experts=100, heads=2, topk=5, d_key=4, query_norm="none", shared_keys=False)
    rng = np.random.default_rng(3)
    params, state = peer_ref.init(cfg, dtype="float32")
    params["query.kernel"] = rng.integers(-1, 2, params["query.kernel"].shape).astype(np.float32)
    for side in ("keys.left", "keys.right"):
        params[side] = rng.integers(-1, 2, params[side].shape).astype(np.float32)
    x = rng.integers(-1, 2, (200, cfg.d_model)).astype(np.float32)
    x[:20] = 0  # all-zero queries: every score is a signed zero
    _, _, aux = peer_ref.forward(cfg, params, state, x)
    _, _, aux_j = be.apply(cfg, be.from_numpy(params), {}, be.from_numpy(x))
    np.testing.assert_array_equal(np.asarray(aux_j["indices"]), aux["indices"])
    s_left, s_right = peer_ref.sub_key_scores(cfg, params, (x @ params["query.kernel"]).reshape(200, 2, 4))
    np.testing.assert_array_equal(np.asarray(aux_j["indices"]), peer_ref.brute_force_topk(cfg, s_left, s_right))


def test_routing_overrides_indices_and_masked_nan_outputs_zero():
    params, state, x, mask, _ = case(SMALL, "float32")
    x[~mask] = np.nan
    routing = np.random.default_rng(1).integers(0, SMALL.n_experts, x.shape[:-1] + (SMALL.heads, SMALL.topk))
    j = be.from_numpy
    y, _, aux = be.apply(SMALL, j(params), j(state), j(x), True, j(mask), j(routing))
    y_ref, _, _ = peer_ref.forward(SMALL, params, state, x, True, mask, routing)
    np.testing.assert_array_equal(np.asarray(aux["indices"]), routing)
    assert np.all(np.asarray(y)[~mask] == 0)
    assert_close(np.asarray(y)[mask], y_ref[mask], 1e-5, "y with routing")


def test_module_has_canonical_names_and_matches_functional():
    module = be.layer(SMALL, seed=4)
    param_paths = {".".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    stat_paths = {".".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(module, nnx.BatchStat))}
    assert param_paths == set(SMALL.param_shapes()) and stat_paths == set(SMALL.state_shapes())
    glu = be.layer(CHUNKED, seed=4)  # GLU experts: experts.gate joins the experts group
    assert {".".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(glu, nnx.Param))} == set(
        CHUNKED.param_shapes()
    )

    params, state = module.params_and_state()
    _, _, x, mask, _ = case(SMALL, "float32")
    y = module(be.from_numpy(x), be.from_numpy(mask))  # training mode by default
    y_fn, new_state, _ = be.apply(SMALL, params, state, be.from_numpy(x), True, be.from_numpy(mask))
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_fn), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(
        np.asarray(module.query_norm.mean.get_value()), np.asarray(new_state["query_norm.mean"])
    )

    module.eval()
    y_eval = module(be.from_numpy(x))
    y_ref, _, _ = peer_ref.forward(SMALL, be.to_numpy(params), be.to_numpy(new_state), x, False)
    assert_close(y_eval, y_ref, 1e-5, "module in eval mode")

    fresh = be.layer(SMALL, seed=9, use_running_average=True)
    fresh.load_params_and_state(be.to_numpy(params), be.to_numpy(new_state))
    np.testing.assert_allclose(np.asarray(fresh(be.from_numpy(x))), np.asarray(y_eval), rtol=1e-6, atol=1e-6)


def test_optax_step_inside_a_flax_model_lowers_the_loss():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.peer = be.layer(SMALL, rngs=rngs)
            self.head = nnx.Linear(SMALL.d_out, 1, rngs=rngs)

        def __call__(self, x):
            return self.head(self.peer(x))

    model = Model(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.05), wrt=nnx.Param)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, SMALL.d_model)), jnp.float32)
    target = jnp.asarray(x[:, :1] * 2.0)

    def loss_fn(model):
        return jnp.mean((model(x) - target) ** 2)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    before = jax.tree.map(np.asarray, model.peer.params_and_state()[0])
    first = step(model, optimizer)
    losses = [float(step(model, optimizer)) for _ in range(5)]
    assert losses[-1] < float(first)
    after = model.peer.params_and_state()[0]
    assert all(not np.array_equal(before[name], np.asarray(after[name])) for name in ("query.kernel", "keys.left"))
    assert not np.array_equal(np.asarray(model.peer.query_norm.mean.get_value()), np.zeros(SMALL.d_query))


def reference_error(call):
    with pytest.raises(PEERInputError) as info:
        call()
    return str(info.value)


@pytest.mark.parametrize("bad", ["x_dtype", "x_shape", "mask_dtype", "routing_range", "training", "params_name"])
def test_bad_inputs_raise_the_reference_error(bad):
    params, state, x, mask, _ = case(SMALL, "float32")
    routing = None
    training = True
    if bad == "x_dtype":
        x = x.astype(np.float16)
    elif bad == "x_shape":
        x = x[..., :-1]
    elif bad == "mask_dtype":
        mask = mask.astype(np.int32)
    elif bad == "routing_range":
        routing = np.zeros(x.shape[:-1] + (SMALL.heads, SMALL.topk), np.int64)
        routing[1, 2, 0, 3] = SMALL.n_experts
    elif bad == "training":
        training = 1
    elif bad == "params_name":
        params["query.bias"] = np.zeros(SMALL.d_query, np.float32)
    expected = reference_error(lambda: peer_ref.forward(SMALL, params, state, x, training, mask, routing))
    j = be.from_numpy
    got = reference_error(lambda: be.apply(SMALL, j(params), j(state), j(x), training, j(mask), j(routing)))
    assert got == expected


def test_float64_without_x64_is_refused_with_the_fix():
    if jax.config.jax_enable_x64:
        pytest.skip("x64 mode is on in this process")
    fix = re.escape("jax.config.update('jax_enable_x64', True)")
    with pytest.raises(PEERInputError, match=fix):
        be.init(SMALL, dtype="float64")
    with pytest.raises(PEERInputError, match=fix):
        be.from_numpy(np.zeros(3))
    params, state = peer_ref.init(SMALL, dtype="float64")
    with pytest.raises(PEERInputError, match=fix):
        be.apply(SMALL, params, state, np.zeros((2, SMALL.d_model)))


def test_jit_specialises_on_the_token_count_and_padding_to_a_bucket_is_exact():
    # jax.jit compiles once per input shape: every new token count is a new compilation.
    # Padding to a few bucket sizes with the mask (SPEC §5: padding is inert) bounds them,
    # and gives the unpadded tokens' outputs and batch-norm statistics.
    params, state = be.init(SMALL, seed=1)
    rng = np.random.default_rng(1)
    bucket = 8
    be.peer.forward_jit.clear_cache()
    for tokens in (3, 5, 8):
        x = rng.standard_normal((tokens, SMALL.d_model)).astype(np.float32)
        y, new_state, _ = be.apply(SMALL, params, state, be.from_numpy(x), True)
        padded = np.concatenate([x, np.full((bucket - tokens, SMALL.d_model), np.nan, np.float32)])
        mask = np.arange(bucket) < tokens
        y_pad, state_pad, _ = be.apply(SMALL, params, state, be.from_numpy(padded), True, be.from_numpy(mask))
        assert_close(np.asarray(y_pad)[:tokens], y, 1e-6, f"y, {tokens} tokens")
        assert not np.asarray(y_pad)[tokens:].any()
        for name in new_state:
            assert_close(state_pad[name], new_state[name], 1e-6, f"{name}, {tokens} tokens")
    # Three unpadded token counts, three compilations; the padded calls share one.
    assert be.peer.forward_jit._cache_size() == 3 + 1


def test_largest_expert_count_routes_to_positive_int32_indices():
    """SPEC §1: N <= 46340**2 keeps every expert index inside int32, the index dtype without x64.
    The best sub-keys last on both sides give the largest indices; the runner-up is an exact tie,
    which goes to the lower expert index (SPEC §4.1)."""
    cfg = peer_ref.PEERConfig(d_model=2, n_experts=peer_ref.MAX_N_KEYS**2, heads=1, topk=2, d_key=2)
    scores = np.arange(cfg.n_keys, dtype=np.float32).reshape(1, 1, -1)
    expected = peer_ref.product_key_topk(cfg, scores.astype(np.float64), scores.astype(np.float64))
    assert expected.tolist() == [[[46339 * 46340 + 46339, 46338 * 46340 + 46339]]]
    got = jax.jit(lambda s: be.routing._product_key_topk(cfg, s, s))(jnp.asarray(scores))
    assert got.dtype == jnp.int32 and np.asarray(got).tolist() == expected.tolist(), f"got {got}"


def _state_of(module):
    return {name: np.asarray(value) for name, value in module.params_and_state()[1].items()}


@pytest.mark.parametrize(
    "training, masked, jit", [(True, False, False), (True, True, True), (False, False, True), (False, True, False)]
)
def test_float32_module_promotes_bfloat16_activations_like_nnx_linear(training, masked, jit):
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((3, 7, SMALL.d_model)), jnp.bfloat16)
    mask = jnp.asarray(rng.random((3, 7)) < 0.7) if masked else None
    module, twin = (be.layer(SMALL, seed=2, use_running_average=not training) for _ in range(2))
    call = nnx.jit(lambda m, x, mask: m(x, mask)) if jit else (lambda m, x, mask: m(x, mask))
    y = call(module, x, mask)
    linear = nnx.Linear(SMALL.d_model, 2, rngs=nnx.Rngs(0))
    assert y.dtype == linear(x).dtype == jnp.float32  # the promotion rule nnx.Linear follows
    want = call(twin, x.astype(jnp.float32), mask)  # promotion is exactly an upcast of x
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want))
    assert all(np.array_equal(a, b) for a, b in zip(_state_of(module).values(), _state_of(twin).values()))
    grads = nnx.grad(lambda m: m(x, mask).sum())(module)
    assert grads["experts"]["down"].get_value().dtype == jnp.float32


def test_dtype_is_the_computation_dtype_and_param_dtype_the_storage():
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((9, SMALL.d_model)), jnp.bfloat16)
    module = be.layer(SMALL, seed=3, param_dtype=jnp.bfloat16, dtype=jnp.float32)
    params, state = module.params_and_state()
    assert params["experts.down"].dtype == jnp.bfloat16 and state["query_norm.mean"].dtype == jnp.float32
    y = module(x)
    # Computing in float32 reads the bfloat16 parameters upcast, as nnx.Linear's promote_dtype does.
    up = {name: value.astype(jnp.float32) for name, value in params.items()}
    want, new_state, _ = be.apply(SMALL, up, state, x.astype(jnp.float32), training=True)
    assert y.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want))
    np.testing.assert_array_equal(_state_of(module)["query_norm.var"], np.asarray(new_state["query_norm.var"]))
    grads = nnx.grad(lambda m: m(x).sum())(module)
    assert grads["experts"]["up"].get_value().dtype == jnp.bfloat16  # gradients in the storage dtype
    # dtype=None with bfloat16 storage and bfloat16 x: bfloat16 all the way (SPEC §10's bfloat16 row).
    native = be.layer(SMALL, seed=3, param_dtype=jnp.bfloat16)
    y16 = native(x)
    want16, _, _ = be.apply(SMALL, native.params_and_state()[0], state, x, training=True)
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y16), np.asarray(want16))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dtype": "float32"}, "dtype='float32' is a string, but expected a JAX dtype such as jnp.float32"),
        ({"param_dtype": "bfloat16"}, "param_dtype='bfloat16' is a string, but expected a JAX dtype"),
        ({"param_dtype": jnp.int32}, "param_dtype=int32, but expected one of"),
        ({"dtype": jnp.complex64}, "dtype=complex64, but expected one of"),
    ],
)
def test_dtype_arguments_take_jax_dtypes(kwargs, message):
    with pytest.raises(PEERInputError, match=re.escape(message)):
        be.layer(SMALL, rngs=nnx.Rngs(0), **kwargs)


def test_integer_activations_are_refused():
    with pytest.raises(PEERInputError, match=re.escape("x.dtype=int32, but expected a floating array")) as info:
        be.layer(SMALL, rngs=nnx.Rngs(0))(jnp.zeros((2, SMALL.d_model), jnp.int32))
    assert "param_dtype=float32" in str(info.value) and "compute_dtype=" not in str(info.value)  # the layer's words


@pytest.mark.parametrize(
    "training, masked, jit", [(True, False, True), (True, True, False), (False, False, False), (False, True, True)]
)
def test_bfloat16_dtype_with_float32_params_is_the_mixed_mode(training, masked, jit):
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.standard_normal((3, 5, SMALL.d_model)), jnp.float32)
    mask = jnp.asarray(rng.random((3, 5)) < 0.7) if masked else None
    module = be.layer(SMALL, seed=7, dtype=jnp.bfloat16, use_running_average=not training)
    params, state = module.params_and_state()
    call = nnx.jit(lambda m, x, mask: m(x, mask)) if jit else (lambda m, x, mask: m(x, mask))
    y = call(module, x, mask)  # x is cast to the computation dtype, as nnx.Linear casts it
    want, new_state, _ = be.apply(
        SMALL, params, state, x.astype(jnp.bfloat16), training=training, mask=mask, compute_dtype="bfloat16"
    )
    assert y.dtype == jnp.bfloat16 and module.experts.down.get_value().dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(want, np.float32))
    for name, value in new_state.items():
        np.testing.assert_array_equal(_state_of(module)[name], np.asarray(value))
    grads = nnx.grad(lambda m: m(x, mask).astype(jnp.float32).sum())(module)
    assert grads["keys"]["left"].get_value().dtype == jnp.float32


@pytest.mark.parametrize("topk", [1, 3, 8, 16])
def test_pruned_search_equals_the_full_search_in_every_regime(topk):
    """Stage two scores only peer_ref.routing.pruned_candidates; a row that lemma leaves open is
    redone over all k*k pairs, one by one up to routing.redo_budget rows, else all rows (a
    conditional). Continuous scores (nothing redone), a few coarse rows (some redone), all rows
    coarse (all redone) and non-finite scores must all give the reference's experts."""
    cfg = peer_ref.PEERConfig(d_model=4, n_experts=(2 * topk + 3) ** 2, heads=2, topk=topk, d_key=4)
    rng = np.random.default_rng(topk)
    search = jax.jit(lambda left, right: be.routing._product_key_topk(cfg, left, right))
    tokens = 1500
    budget = be.routing.redo_budget(tokens * cfg.heads)
    few = budget // 4
    for regime in ("continuous", "few coarse rows", "all coarse", "non-finite"):
        sub = rng.standard_normal((2, tokens, cfg.heads, cfg.n_keys)).astype(np.float32)
        if regime == "few coarse rows":
            sub[:, :few] = np.round(sub[:, :few])
        elif regime == "all coarse":
            sub = np.round(sub * 2)
        elif regime == "non-finite":
            sub[0, 3, 1, 2], sub[1, 7, 0, :], sub[0, 9, 0, 1], sub[1, 11, 1, 0] = np.nan, -np.inf, np.inf, -np.inf
        expected = peer_ref.product_key_topk(cfg, *sub)
        got = np.asarray(search(jnp.asarray(sub[0]), jnp.asarray(sub[1])))
        np.testing.assert_array_equal(got, expected, err_msg=f"k={topk}, {regime}")
        assert got.dtype == np.int32
        if topk > 1:  # k = 1 scores its one candidate: nothing to prune, nothing to redo
            open_rows = _rows_the_lemma_leaves_open(sub, topk)
            want = {
                "continuous": (0, budget),
                "few coarse rows": (1, budget),
                "all coarse": (budget + 1, None),
                "non-finite": (2, budget),
            }[regime]  # rows 7 and 9 hold -inf and inf in their k best
            assert want[0] <= open_rows <= (want[1] or open_rows), f"k={topk}, {regime}: {open_rows} rows redone"


def _rows_the_lemma_leaves_open(sub, k):
    """Rows whose k+1 best pruned sums tie or whose stage-one lists are not all finite."""
    rows = sub.reshape(2, -1, sub.shape[-1])
    index = np.broadcast_to(np.arange(rows.shape[-1]), rows.shape)
    top, _ = peer_ref.routing.topk_lower_index(np.where(np.isnan(rows), -np.inf, rows), index, k)
    a, b = peer_ref.routing.pruned_candidates(k)
    sums = np.sort(top[0][:, a] + top[1][:, b], axis=-1)[:, ::-1][:, : k + 1]
    tied = (sums[:, 1:] == sums[:, :-1]).any(-1)
    return int((tied | ~np.isfinite(top).all(-1).all(0)).sum())


def test_layer_draws_from_the_rngs_and_an_explicit_seed_gives_the_reference_tables():
    rngs = nnx.Rngs(0)
    first, second = be.PEER(SMALL, rngs=rngs), be.PEER(SMALL, rngs=rngs)
    again = be.PEER(SMALL, rngs=nnx.Rngs(0))

    def down(module):
        return np.asarray(module.experts.down.get_value())

    assert not np.array_equal(down(first), down(second))
    assert np.array_equal(down(first), down(again))
    params, state = peer_ref.init(SMALL, seed=5, dtype="float32")
    seeded_params, seeded_state = be.PEER(SMALL, seed=5).params_and_state()
    for name, value in {**seeded_params, **seeded_state}.items():
        assert np.array_equal(np.asarray(value), {**params, **state}[name]), name
    half = be.PEER(SMALL, seed=5, param_dtype=jnp.bfloat16).params_and_state()[0]["experts.down"]
    assert np.array_equal(np.asarray(half), params["experts.down"].astype(jnp.bfloat16))
    for kwargs, message in [
        ({}, "got neither of rngs= and seed="),
        ({"rngs": nnx.Rngs(0), "seed": 1}, "got both"),
        ({"rngs": 0}, "rngs is int, but expected an nnx.Rngs"),
        ({"seed": -2}, "seed=-2, but expected None"),
    ]:
        with pytest.raises(PEERConfigError, match=re.escape(message)):
            be.PEER(SMALL, **kwargs)


def test_repr_shows_the_config_and_the_tables():
    text = repr(be.PEER(SMALL, rngs=nnx.Rngs(0)))
    assert repr(SMALL) in text and f"shape={SMALL.param_shapes()['experts.down']}" in text


def test_the_package_exports_its_layer_as_peer():
    from peer_backends.jax import PEER

    assert isinstance(be.layer(SMALL, rngs=nnx.Rngs(0)), PEER) and issubclass(PEER, nnx.Module)


def test_every_role_has_its_name(unresolved_roles):
    """peer_backends.contract.ROLES is true of this backend: one name per role in every backend."""
    assert unresolved_roles("jax") == []


ISSUE_23 = peer_ref.PEERConfig(d_model=2, n_experts=1, heads=1, topk=1, d_key=2)
STEP_X = np.array([[1.0, 0.0], [0.0, 3.0]], dtype=np.float32)


@pytest.mark.parametrize("remat", ["plain", "jax.checkpoint", "nnx.remat"])
def test_rematerialisation_updates_the_statistics_once(remat):
    # SPEC §3.3: one training step under rematerialisation moves the running statistics once.
    from flax import nnx

    from peer_backends.jax.layer import PEER

    params, state = peer_ref.init(ISSUE_23, seed=0, dtype="float32")
    layer = PEER(ISSUE_23, seed=0)

    def plain(layer, x):
        return layer(x).sum()

    def checkpointed(layer, x):
        graph, rest = nnx.split(layer)

        @jax.checkpoint
        def pure(rest, x):
            module = nnx.merge(graph, rest)
            return module(x).sum(), nnx.state(module)

        value, new_rest = pure(rest, x)
        nnx.update(layer, new_rest)
        return value

    loss = {"jax.checkpoint": checkpointed, "nnx.remat": nnx.remat(plain)}.get(remat, plain)

    nnx.grad(loss)(layer, jnp.asarray(STEP_X))
    expected = peer_ref.forward(ISSUE_23, params, state, STEP_X, True)[1]
    np.testing.assert_allclose(expected["query_norm.mean"], [0.0724, 0.0065], atol=5e-5)
    got = layer.params_and_state()[1]
    for name in expected:
        np.testing.assert_allclose(np.asarray(got[name]), expected[name], rtol=1e-6)
