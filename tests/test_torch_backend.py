"""The torch backend against the reference: functional API, nn.Module, kernels, ties, errors."""

import ml_dtypes
import numpy as np
import pytest

import peer_ref
from peer_ref import PEERConfig, PEERConfigError, PEERInputError

torch = pytest.importorskip("torch")
import peer_backends
from peer_backends.torch import experts as torch_experts
from peer_backends.torch import peer as torch_peer
from peer_backends.torch import routing as torch_routing

be = peer_backends.get("torch")

FULL = PEERConfig(d_model=12, n_experts=49, heads=3, topk=4, d_key=6, d_out=5, query_bias=True)
PER_HEAD = PEERConfig(
    d_model=8,
    n_experts=36,
    heads=2,
    topk=3,
    d_key=4,
    shared_keys=False,
    query_norm="none",
    activation="silu",
    score="sigmoid",
    expert_glu=True,
)


def reference_inputs(cfg, seed=0, lead=(2, 5), dtype="float64"):
    params, state = peer_ref.init(cfg, seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(lead + (cfg.d_model,)).astype(dtype)
    mask = rng.random(lead) > 0.3
    dy = rng.standard_normal(lead + (cfg.d_out,)).astype(dtype)
    return params, state, x, mask, dy


def assert_close(actual, expected, tol=1e-10):
    np.testing.assert_allclose(be.to_numpy(actual), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("cfg", [FULL, PER_HEAD])
def test_state_dict_has_the_canonical_names(cfg):
    module = be.layer(cfg)
    expected = {**cfg.param_shapes(), **cfg.state_shapes()}
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == expected
    assert {k for k, v in module.named_parameters()} == set(cfg.param_shapes())


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("cfg", [FULL, PER_HEAD])
def test_module_and_functional_equal_the_reference(cfg, training):
    params, state, x, mask, _ = reference_inputs(cfg)
    y_ref, state_ref, aux_ref = peer_ref.forward(cfg, params, state, x, training, mask)

    y, new_state, aux = be.apply(
        cfg, be.from_numpy(params), be.from_numpy(state), be.from_numpy(x), training, be.from_numpy(mask)
    )
    assert_close(y, y_ref)
    for name in state_ref:
        assert_close(new_state[name], state_ref[name])
    assert aux["indices"].dtype == torch.int64
    np.testing.assert_array_equal(be.to_numpy(aux["indices"]), aux_ref["indices"])
    assert_close(aux["weights"], aux_ref["weights"])

    module = be.layer(cfg, dtype="float64")
    module.load_params_and_state(be.from_numpy(params), be.from_numpy(state))
    module.train(training)
    y, aux = module(be.from_numpy(x), mask=be.from_numpy(mask), return_aux=True)
    assert_close(y.detach(), y_ref)
    np.testing.assert_array_equal(be.to_numpy(aux["indices"]), aux_ref["indices"])
    # Training updates the module's buffers in place; evaluation leaves them alone.
    for name in state_ref:
        assert_close(module.get_buffer(name), state_ref[name])
    if training and state_ref:
        assert not np.allclose(state_ref["query_norm.mean"], state["query_norm.mean"])


@pytest.mark.parametrize("training", [False, True])
def test_vjp_equals_the_reference(training):
    params, state, x, mask, dy = reference_inputs(FULL, seed=3)
    grads_ref, dx_ref = peer_ref.vjp(FULL, params, state, x, dy, training, mask)
    grads, dx = be.vjp(
        FULL,
        be.from_numpy(params),
        be.from_numpy(state),
        be.from_numpy(x),
        be.from_numpy(dy),
        training,
        be.from_numpy(mask),
    )
    assert set(grads) == set(grads_ref)
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], tol=1e-9)
    assert_close(dx, dx_ref, tol=1e-9)


@pytest.mark.parametrize("tokens", [1, 2, 9])
def test_unmasked_training_equals_the_reference(tokens):
    # Without a mask the batch norm runs fused (two or more tokens); one token takes the general path.
    params, state, x, _, dy = reference_inputs(FULL, seed=4, lead=(tokens,))
    y_ref, state_ref, _ = peer_ref.forward(FULL, params, state, x, True)
    grads_ref, dx_ref = peer_ref.vjp(FULL, params, state, x, dy, True)
    t = be.from_numpy
    y, new_state, _ = be.apply(FULL, t(params), t(state), t(x), True)
    grads, dx = be.vjp(FULL, t(params), t(state), t(x), t(dy), True)
    assert_close(y, y_ref)
    for name in state_ref:
        assert_close(new_state[name], state_ref[name])
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], tol=1e-9)
    assert_close(dx, dx_ref, tol=1e-9)


def test_module_gradients_reach_an_optimizer():
    module = be.layer(PER_HEAD, seed=1)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    x = torch.randn(4, PER_HEAD.d_model)
    before = module.experts.up.detach().clone()
    module(x).square().sum().backward()
    optimizer.step()
    assert not torch.equal(before, module.experts.up)


@pytest.mark.parametrize("projection", ["down_projection", "up_projection"])
def test_expert_projections_pass_gradcheck(projection):
    # Repeated experts, within a token and across tokens, must accumulate.
    indices = torch.tensor([[0, 6, 6, 2], [6, 1, 0, 3], [5, 5, 5, 5]])
    # The down projection's first input is x (T, d); the up projection's the weights (T, heads*topk).
    first = torch.randn(3, 2 if projection == "down_projection" else 4, dtype=torch.float64, requires_grad=True)
    table = torch.randn(7, 2, dtype=torch.float64, requires_grad=True)
    fn = getattr(torch_experts, projection)
    groups = torch_experts.expert_groups(indices, table.shape[0])
    assert torch.autograd.gradcheck(lambda a, t: fn(a, t, indices, groups), (first, table))


@pytest.mark.parametrize("key_sets", [1, 3])
def test_selected_scores_pass_gradcheck(monkeypatch, key_sets):
    # Chunks of one token for the sub-key gradient; repeated sub-keys within a head must accumulate.
    monkeypatch.setattr(torch_routing, "KEY_GRAD_ELEMENTS", 1)
    tokens, heads, n, d_half, k = 4, 3, 5, 2, 3
    queries = torch.randn(tokens, heads, 2 * d_half, dtype=torch.float64, requires_grad=True)
    keys = [torch.randn(key_sets, n, d_half, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    halves = torch.randint(0, n, (2, tokens, heads, k))
    halves[:, 0, 0] = torch.tensor([1, 1, 4])

    def selected(q, left, right):
        per_head = [keys_.expand(heads, n, d_half) for keys_ in (left, right)]
        sub = torch.stack(
            [
                torch.einsum("thd,hnd->thn", q[..., side * d_half : (side + 1) * d_half], per_head[side])
                for side in range(2)
            ]
        )
        return torch_routing.selected_scores(q, left, right, halves, sub.detach())

    assert torch.autograd.gradcheck(selected, (queries, *keys))


def test_expert_kernels_equal_gather_and_scatter():
    rows = torch.randn(7, 3, dtype=torch.float64)
    table = torch.randn(9, 3, dtype=torch.float64)
    indices = torch.randint(0, 8, (7, 4))  # table row 8 is never selected: its gradient row must be 0
    weights = torch.randn(7, 4, dtype=torch.float64)
    groups = torch_experts.expert_groups(indices, 9)
    torch.testing.assert_close(
        torch_experts.down_projection(rows, table, indices, groups), torch.einsum("tjd,td->tj", table[indices], rows)
    )
    torch.testing.assert_close(
        torch_experts.up_projection(weights, table, indices), torch.einsum("tjd,tj->td", table[indices], weights)
    )
    outer = torch.ops.peer.row_outer(weights, rows, *groups)
    expected_outer = torch.zeros(9, 3, dtype=torch.float64).index_add_(
        0, indices.reshape(-1), (weights[..., None] * rows[:, None, :]).reshape(-1, 3)
    )
    torch.testing.assert_close(outer, expected_outer)
    assert not outer[8].any()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_exact_ties_follow_the_order_rule(dtype):
    # Small integers are exact in every dtype, so scores tie exactly and often.
    cfg = PEERConfig(d_model=6, n_experts=64, heads=2, topk=5, d_key=6, query_norm="none")
    rng = np.random.default_rng(7)
    params, state = peer_ref.init(cfg, seed=0, dtype=dtype)
    for name in ("query.kernel", "keys.left", "keys.right"):
        params[name] = rng.integers(-1, 2, params[name].shape).astype(dtype)
    x = rng.integers(-1, 2, (40, cfg.d_model)).astype(dtype)
    _, _, aux_ref = peer_ref.forward(cfg, params, state, x)
    _, _, aux = be.apply(cfg, be.from_numpy(params), be.from_numpy(state), be.from_numpy(x))
    np.testing.assert_array_equal(be.to_numpy(aux["indices"]), aux_ref["indices"])


def test_product_key_topk_breaks_ties_like_the_reference():
    cfg = PEERConfig(d_model=4, n_experts=100, heads=3, topk=6, d_key=4)
    rng = np.random.default_rng(2)
    for dtype in (np.float32, np.float64):
        s_left = rng.integers(-2, 3, (50, 3, 10)).astype(dtype)
        s_right = rng.integers(-2, 3, (50, 3, 10)).astype(dtype)
        s_left[0, 0] = -0.0  # -0.0 and +0.0 are equal as floats, so they tie
        s_left[0, 0, ::2] = 0.0
        expected = peer_ref.product_key_topk(cfg, s_left, s_right)
        actual = torch_routing._product_key_topk(cfg, torch.from_numpy(np.stack([s_left, s_right])))
        np.testing.assert_array_equal(actual.numpy(), expected)


@pytest.mark.parametrize("topk", [1, 2, 5, 8])
def test_pruned_candidates_equal_all_candidates(topk):
    # Only about k ln k of the k*k candidates are scored; continuous scores (no ties) and
    # coarse ones (many ties, redone under the full order) must both give the full search.
    cfg = PEERConfig(d_model=4, n_experts=144, heads=2, topk=topk, d_key=4)
    rng = np.random.default_rng(topk)
    for scale in (None, 2):
        sub = rng.standard_normal((2, 300, 2, 12))
        if scale:
            sub = np.round(sub * scale)
        for dtype in (np.float32, np.float64):
            expected = peer_ref.brute_force_topk(cfg, *sub.astype(dtype))
            actual = torch_routing._product_key_topk(cfg, torch.from_numpy(sub.astype(dtype)))
            np.testing.assert_array_equal(actual.numpy(), expected)


def test_bfloat16_converts_bit_for_bit():
    bits = np.arange(-(2**15), 2**15, dtype=np.int64).astype(np.int16)
    array = bits.view(ml_dtypes.bfloat16)
    tensor = be.from_numpy(array)
    assert tensor.dtype == torch.bfloat16
    np.testing.assert_array_equal(tensor.view(torch.int16).numpy(), bits)
    back = be.to_numpy({"a": [tensor]})["a"][0]
    assert back.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(back.view(np.int16), bits)


def test_bfloat16_follows_the_dtype_policy():
    params, state = be.init(FULL, seed=0, dtype="bfloat16")
    assert {str(v.dtype) for v in params.values()} == {"torch.bfloat16"}
    assert {str(v.dtype) for v in state.values()} == {"torch.float32"}
    x = torch.randn(3, FULL.d_model).to(torch.bfloat16)
    y, new_state, aux = be.apply(FULL, params, state, x, training=True)
    assert y.dtype == torch.bfloat16 and aux["scores"].dtype == torch.float32
    assert new_state["query_norm.mean"].dtype == torch.float32

    def widen(tree):
        return {k: v.astype(np.float64) for k, v in be.to_numpy(tree).items()}

    y_ref, _, _ = peer_ref.forward(
        FULL, widen(params), widen(state), be.to_numpy(x).astype(np.float64), True, routing=be.to_numpy(aux["indices"])
    )
    np.testing.assert_allclose(be.to_numpy(y).astype(np.float64), y_ref, rtol=2e-2, atol=2e-2)


def test_init_is_seeded_and_on_the_requested_dtype():
    a, _ = be.init(PER_HEAD, seed=4)
    b, _ = be.init(PER_HEAD, seed=4)
    c, _ = be.init(PER_HEAD, seed=5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["experts.down"], c["experts.down"])
    assert a["experts.down"].dtype == torch.float32


def _errors(call):
    try:
        call()
    except PEERInputError as err:
        return str(err)
    raise AssertionError("no PEERInputError raised")


@pytest.mark.parametrize("case", ["x_dtype", "d_model", "mask_dtype", "routing_range", "missing_param", "dy_shape"])
def test_bad_inputs_raise_the_reference_errors(case):
    params, state, x, mask, dy = reference_inputs(FULL)
    routing = None
    if case == "x_dtype":
        x = x.astype(np.float32)
    elif case == "d_model":
        x = x[..., :-1]
    elif case == "mask_dtype":
        mask = mask.astype(np.int32)
    elif case == "routing_range":
        routing = np.zeros(x.shape[:-1] + (FULL.heads, FULL.topk), np.int64)
        routing[0, 0, 0, 0] = FULL.n_experts
    elif case == "missing_param":
        del params["keys.left"]
    else:
        dy = dy[:1]
    expected = _errors(lambda: peer_ref.vjp(FULL, params, state, x, dy, False, mask, routing))
    t = be.from_numpy
    assert _errors(lambda: be.vjp(FULL, t(params), t(state), t(x), t(dy), False, t(mask), t(routing))) == expected


def test_compiled_module_matches_eager():
    cfg = PEERConfig(d_model=8, n_experts=16, heads=2, topk=2, d_key=4)
    module = be.layer(cfg, seed=2).eval()
    x = torch.randn(6, cfg.d_model)
    expected, aux = module(x, return_aux=True)
    compiled = torch.compile(module)
    y, compiled_aux = compiled(x, return_aux=True)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(compiled_aux["indices"], aux["indices"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    params, state, x, mask, dy = reference_inputs(FULL, seed=5, dtype="float32")
    cpu = [be.from_numpy(a) for a in (params, state, x, dy, mask)]
    gpu = [be.from_numpy(a) for a in (params, state)] + [be.from_numpy(a).cuda() for a in (x, dy, mask)]
    y_cpu, _, aux_cpu = be.apply(FULL, cpu[0], cpu[1], cpu[2], True, cpu[4])
    y_gpu, _, aux_gpu = be.apply(FULL, gpu[0], gpu[1], gpu[2], True, gpu[4])
    assert y_gpu.is_cuda
    np.testing.assert_allclose(be.to_numpy(y_gpu), be.to_numpy(y_cpu), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(be.to_numpy(aux_gpu["indices"]), be.to_numpy(aux_cpu["indices"]))
    grads_cpu, _ = be.vjp(FULL, cpu[0], cpu[1], cpu[2], cpu[3], True, cpu[4])
    grads_gpu, _ = be.vjp(FULL, gpu[0], gpu[1], gpu[2], gpu[3], True, gpu[4])
    for name in grads_cpu:
        np.testing.assert_allclose(be.to_numpy(grads_gpu[name]), be.to_numpy(grads_cpu[name]), rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------- custom ops and torch.compile


def _opcheck_cases():
    g = torch.Generator().manual_seed(0)
    indices = torch.tensor([[0, 6, 6, 2], [6, 1, 0, 3], [5, 5, 5, 5]])
    groups = tuple(torch_experts.expert_groups(indices, 7))
    grad = {"dtype": torch.float64, "requires_grad": True}
    x, coef = torch.randn(3, 2, generator=g, **grad), torch.randn(3, 4, generator=g, **grad)
    table = torch.randn(7, 2, generator=g, **grad)
    sub = torch.randn(2, 3, 2, 5, dtype=torch.float64, generator=g)
    sub[:, 0] = torch.tensor([1.0, 1.0, 0.0, -0.0, 1.0])  # ties
    queries = torch.randn(3, 2, 4, generator=g, **grad)
    keys = [torch.randn(1, 5, 2, generator=g, **grad) for _ in range(2)]
    halves = torch.randint(0, 5, (2, 3, 2, 3), generator=g)
    return {
        "down_projection": (x, table, indices, *groups),
        "up_projection": (coef, table, indices, *groups),
        "row_outer": (coef.detach(), x.detach(), *groups),
        "expert_groups": (indices, 7),
        "product_key_topk": (sub, 3),
        "checked_routing": (indices.to(torch.int32), 7),
        "selected_scores": (queries, *keys, halves, sub),
        "selected_scores_backward": (
            torch.randn(3, 2, 3, dtype=torch.float64, generator=g),
            queries.detach(),
            *(k.detach() for k in keys),
            halves,
            True,
            True,
            False,
        ),
    }


@pytest.mark.parametrize("op", sorted(_opcheck_cases()))
def test_custom_ops_pass_opcheck(op):
    # The official check of each op's schema, fake (meta) implementation and autograd registration.
    torch.library.opcheck(getattr(torch.ops.peer, op), _opcheck_cases()[op])


def test_checked_routing_raises_the_reference_error():
    with pytest.raises(PEERInputError, match=r"routing contains 7, but expected expert indices in \[0, n_experts=7\)"):
        torch.ops.peer.checked_routing(torch.tensor([[0, 7]]), 7)


# One small config serves every compiled test below: compiling is slow on a small machine.
COMPILED = PEERConfig(d_model=8, n_experts=16, heads=2, topk=2, d_key=4)
LEADS = [(3, 5), (2, 7), (4, 4), (6, 3)]


def _marked(*tensors):
    # How a user declares dynamic batch and sequence dimensions to torch.compile.
    for tensor in tensors:
        if tensor is not None:
            torch._dynamo.mark_dynamic(tensor, [0, 1])
    return tensors


@pytest.mark.parametrize(("training", "dtype"), [(False, "float32"), (True, "bfloat16")])
def test_compiled_module_has_no_graph_breaks_nor_recompiles(training, dtype):
    # fullgraph=True fails on any graph break; the counter fails on a recompilation. aot_eager
    # traces forward and backward through the ops' fake and autograd registrations without
    # inductor's code generation (test_compiled_module_matches_eager and the conformance
    # suite's compiled path cover inductor).
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()  # dynamo's recompile limit counts every graph of PEER.forward so far
    eager = be.layer(COMPILED, seed=2, dtype=dtype).train(training)
    module = be.layer(COMPILED, seed=2, dtype=dtype).train(training)
    counters = {}
    for masked in (False, True):
        counter = counters[masked] = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(module, backend=counter, fullgraph=True)
        for i, lead in enumerate(LEADS):
            x = torch.randn(lead + (COMPILED.d_model,)).to(getattr(torch, dtype))
            mask = torch.rand(lead) > 0.3 if masked else None
            # With a mask, every other call overrides the routing (its own graph).
            routing = torch.randint(0, COMPILED.n_experts, lead + (2, 2)) if masked and i % 2 else None
            if routing is not None:
                y, aux = compiled(*_marked(x, mask, routing), return_aux=True)
                y_eager, aux_eager = eager(x, mask, routing, return_aux=True)
            else:
                y, aux = compiled(*_marked(x, mask), return_aux=True)
                y_eager, aux_eager = eager(x, mask, return_aux=True)
            torch.testing.assert_close(y, y_eager)
            torch.testing.assert_close(aux["indices"], aux_eager["indices"])
            if training:
                y.float().square().sum().backward()
                y_eager.float().square().sum().backward()
        if masked:  # routing values are checked when the graph runs, with the reference's error
            routing[0, 0, 0, 0] = COMPILED.n_experts
            with pytest.raises(PEERInputError, match="routing contains 16"):
                compiled(*_marked(x, mask, routing), return_aux=True)
    for name, value in module.state_dict().items():
        torch.testing.assert_close(value, eager.state_dict()[name])
    if training:
        for (name, param), other in zip(module.named_parameters(), eager.parameters()):
            torch.testing.assert_close(param.grad, other.grad, msg=name)
    assert counters[False].frame_count == 1
    assert counters[True].frame_count == 2  # with and without routing


def test_compiled_apply_compiles_once_for_every_token_count():
    # The functional compiled path (inductor) flattens the leading dimensions to one token
    # dimension and marks it dynamic: one graph for every leading shape with 2 or more tokens.
    torch_peer.clear_caches()
    torch._dynamo.utils.counters.clear()
    for lead in [(5,), (2, 3), (11,), (4, 4)]:
        params, state, x, mask, dy = reference_inputs(COMPILED, seed=len(lead), lead=lead, dtype="float32")
        grads_ref, dx_ref = peer_ref.vjp(COMPILED, params, state, x, dy, True, mask)
        t = be.from_numpy
        grads, dx = be.vjp(COMPILED, t(params), t(state), t(x), t(dy), True, t(mask), jit=True)
        for name in grads_ref:
            assert_close(grads[name], grads_ref[name], tol=1e-4)
        assert_close(dx, dx_ref, tol=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch_peer.clear_caches()


def test_compiled_module_without_marks_compiles_twice_for_every_token_count():
    # Unmarked, torch's automatic dynamic shapes compile the first shape as is and, at the first
    # new one, a dynamic graph that serves every later shape.
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    module = be.layer(COMPILED, seed=2).eval()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(module, backend=counter, fullgraph=True)
    for lead in LEADS + [(5, 5)]:
        x = torch.randn(lead + (COMPILED.d_model,))
        torch.testing.assert_close(compiled(x), module(x))
    assert counter.frame_count == 2


def test_largest_expert_count_routes_to_exact_indices():
    """SPEC §1: N <= 46340**2 keeps the index inside the low 32 bits of the order keys. The best
    sub-keys last on both sides give the largest indices; the runner-up is an exact tie, which goes
    to the lower expert index (SPEC §4.1), through the full-order path."""
    cfg = PEERConfig(d_model=2, n_experts=peer_ref.MAX_N_KEYS**2, heads=1, topk=2, d_key=2)
    scores = np.arange(cfg.n_keys, dtype=np.float64).reshape(1, 1, -1)
    expected = peer_ref.product_key_topk(cfg, scores, scores)
    assert expected.tolist() == [[[46339 * 46340 + 46339, 46338 * 46340 + 46339]]]
    for dtype in (torch.float32, torch.float64):
        sub_scores = torch.tensor(np.stack([scores, scores]), dtype=dtype)
        got = torch_routing._product_key_topk(cfg, sub_scores)
        assert got.tolist() == expected.tolist(), f"{dtype}: got {got.tolist()}"


CAST_CASES = [(True, False, False), (True, True, True), (False, False, True), (False, True, False)]


@pytest.mark.parametrize("training, masked, compiled", CAST_CASES)
@pytest.mark.parametrize("cast", ["to", "bfloat16", "half"])
def test_module_cast_to_16_bits_trains_and_keeps_buffers_like_batchnorm1d(cast, training, masked, compiled):
    # (training, unmasked) with several tokens is the fused batch-norm path.
    module = be.layer(COMPILED, seed=3)
    module = module.to(torch.bfloat16) if cast == "to" else getattr(module, cast)()
    low = torch.float16 if cast == "half" else torch.bfloat16
    module.train(training)
    bn = torch.nn.BatchNorm1d(4).to(low)
    assert module.query_norm.mean.dtype == bn.running_mean.dtype == low
    assert {v.dtype for v in module.state_dict().values()} == {low}
    params, state = module.params_and_state()
    assert state["query_norm.var"].dtype == torch.float32  # the functional API's state dtype
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 6, COMPILED.d_model, generator=gen).to(low)
    mask = torch.rand(3, 6, generator=gen) < 0.7 if masked else None
    if compiled:
        torch._dynamo.reset()  # dynamo's recompile limit counts every graph of PEER.forward so far
    run = torch.compile(module, backend="aot_eager", fullgraph=True) if compiled else module
    y = run(x, mask)
    want, new_state, _ = be.apply(COMPILED, {k: v.detach() for k, v in params.items()}, state, x, training, mask)
    assert y.dtype == low
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    for name, value in module.named_buffers():
        assert value.dtype == low
        torch.testing.assert_close(value, new_state[name].to(low), rtol=0, atol=0)
    dy = torch.randn(y.shape, generator=gen).to(low)
    (y.float() * dy.float()).sum().backward()
    grads, _ = be.vjp(COMPILED, {k: v.detach() for k, v in params.items()}, state, x, dy, training, mask)
    for name, param in module.named_parameters():
        assert param.grad.dtype == low
        torch.testing.assert_close(param.grad, grads[name], rtol=2e-2, atol=2e-2, msg=name)


def test_outside_autocast_a_mismatched_x_is_refused_like_nn_linear():
    module = be.layer(COMPILED, seed=1)
    x = torch.randn(3, COMPILED.d_model, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError):
        torch.nn.Linear(COMPILED.d_model, 2)(x)  # nn.Linear refuses it too
    with pytest.raises(PEERInputError, match="x.dtype=bfloat16"):
        module(x)


@pytest.mark.parametrize("training, masked, compiled", CAST_CASES)
@pytest.mark.parametrize(
    "amp, x_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.float32)]
)
def test_autocast_runs_the_mixed_mode(amp, x_dtype, training, masked, compiled):
    # A float32 module inside torch.autocast equals apply(..., compute_dtype=amp) on x cast to amp,
    # on every path: fused batch norm (training, unmasked), masked, eval, torch.compile.
    module = be.layer(COMPILED, seed=4).train(training)
    params, state = module.params_and_state()
    params = {k: v.detach().clone() for k, v in params.items()}
    state = {k: v.clone() for k, v in state.items()}  # the module's buffers move in training
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 6, COMPILED.d_model, generator=gen).to(x_dtype)
    mask = torch.rand(3, 6, generator=gen) < 0.7 if masked else None
    dy = torch.randn(3, 6, COMPILED.d_out, generator=gen).to(amp)
    if compiled:
        torch._dynamo.reset()  # dynamo's recompile limit counts every graph of PEER.forward so far
    run = torch.compile(module, backend="aot_eager", fullgraph=True) if compiled else module
    with torch.autocast("cpu", dtype=amp):
        y = run(x, mask)
        if masked:  # backward inside the autocast region, which torch advises against
            (y.float() * dy.float()).sum().backward()
    if not masked:
        (y.float() * dy.float()).sum().backward()
    want, new_state, _ = be.apply(COMPILED, params, state, x.to(amp), training, mask, compute_dtype=amp)
    assert y.dtype == amp
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    for name, value in module.named_buffers():
        torch.testing.assert_close(value, new_state[name], rtol=0, atol=0)
    grads, _ = be.vjp(
        COMPILED,
        params,
        state,
        x.to(amp),
        dy,
        training,
        mask,
        compute_dtype="bfloat16" if amp == torch.bfloat16 else "float16",
    )
    for name, param in module.named_parameters():
        assert param.grad.dtype == torch.float32
        # torch autocasts the backward's matmuls inside the region and in compiled graphs: the
        # gradients then carry products rounded to amp. Eager, backward outside: exact.
        tol = 3e-2 if compiled or masked else 0
        torch.testing.assert_close(param.grad, grads[name], rtol=tol, atol=tol, msg=name)


def test_autocast_fed_by_linear_trains_with_one_token_and_many():
    # The setup of the report: nn.Linear under autocast hands the layer bfloat16 activations.
    model = torch.nn.Sequential(torch.nn.Linear(COMPILED.d_model, COMPILED.d_model), be.layer(COMPILED, seed=5))
    for lead in [(1,), (7,), (2, 3)]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(torch.randn(lead + (COMPILED.d_model,)))
        assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
        y.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())


def test_autocast_casts_x_for_a_module_already_in_the_autocast_dtype():
    module, twin = (be.layer(COMPILED, seed=6).bfloat16() for _ in range(2))
    x = torch.randn(5, COMPILED.d_model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x)  # float32 x meets bfloat16 parameters: autocast casts x, as for nn.Linear
    torch.testing.assert_close(y, twin(x.bfloat16()), rtol=0, atol=0)
    torch.testing.assert_close(module.query_norm.var, twin.query_norm.var, rtol=0, atol=0)


SEEDED = PEERConfig(d_model=8, n_experts=16, heads=2, topk=2, d_key=4, expert_glu=True, query_bias=True)


def test_layer_draws_from_torchs_generator_and_an_explicit_seed_gives_the_reference_tables():
    torch.manual_seed(1)
    first, second = be.PEER(SEEDED), be.PEER(SEEDED)
    torch.manual_seed(1)
    again = be.PEER(SEEDED)
    assert not torch.equal(first.experts.down, second.experts.down)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    params, state = peer_ref.init(SEEDED, seed=3, dtype="float32")
    seeded = be.PEER(SEEDED, seed=3)
    for name, value in seeded.state_dict().items():
        assert np.array_equal(be.to_numpy(value), {**params, **state}[name]), name
    half = be.PEER(SEEDED, seed=3, dtype=torch.bfloat16)  # a torch dtype or its name
    assert np.array_equal(be.to_numpy(half.experts.down), params["experts.down"].astype(ml_dtypes.bfloat16))
    with pytest.raises(PEERConfigError, match=r"seed=1.5, but expected None \(draw from the framework"):
        be.PEER(SEEDED, seed=1.5)


def test_meta_device_then_reset_parameters_as_torch_modules_do():
    torch.manual_seed(4)
    module = be.PEER(SEEDED, device="meta")
    assert module.experts.down.is_meta
    module.to_empty(device="cpu")
    torch.manual_seed(4)
    module.reset_parameters()
    torch.manual_seed(4)
    assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), be.PEER(SEEDED).state_dict().values()))


def test_repr_shows_the_config_and_table_shapes():
    text = repr(be.PEER(SEEDED, seed=0))
    assert repr(SEEDED) in text and "seed=0" in text and "Module()" not in text
    assert "(experts): Tables(down: (16, 8) float32, gate: (16, 8) float32, up: (16, 8) float32" in text
    assert "(query_norm): Tables(scale: (8,) float32, offset: (8,) float32, mean: (8,) float32" in text


def test_last_aux_still_reads_with_a_deprecation_warning():
    module = be.PEER(SEEDED, seed=0)
    _, aux = module(torch.randn(3, SEEDED.d_model), return_aux=True)
    with pytest.warns(FutureWarning, match="return_aux=True"):
        assert torch.equal(module.last_aux["indices"], aux["indices"])


def test_dtype_errors_name_the_layers_remedy_not_compute_dtype():
    module = be.PEER(SEEDED, seed=0)
    with pytest.raises(PEERInputError, match=r"x.dtype=bfloat16, but expected float32 .*torch.autocast") as info:
        module(torch.randn(3, SEEDED.d_model, dtype=torch.bfloat16))
    assert "compute_dtype=" not in str(info.value)
    with pytest.raises(PEERInputError, match=r"x.dtype=float32, but expected float64 .*\.to\(dtype\)"):
        be.PEER(SEEDED, seed=0, dtype="float64")(torch.randn(3, SEEDED.d_model))


def test_the_package_exports_its_layer_as_peer():
    from peer_backends.torch import PEER

    assert PEER is be.layer and isinstance(PEER(SEEDED, seed=0), torch.nn.Module)


def test_every_role_has_its_name(unresolved_roles):
    """peer_backends.contract.ROLES is true of this backend: one name per role in every backend."""
    assert unresolved_roles("torch") == []


ISSUE_23 = PEERConfig(d_model=2, n_experts=1, heads=1, topk=1, d_key=2)
STEP_X = np.array([[1.0, 0.0], [0.0, 3.0]])


def _issue_layer(dtype="float32"):
    params, state = peer_ref.init(ISSUE_23, seed=0, dtype=dtype)
    layer = be.layer(ISSUE_23, dtype=dtype)
    layer.load_params_and_state(
        {k: torch.from_numpy(v) for k, v in params.items()}, {k: torch.from_numpy(v) for k, v in state.items()}
    )
    return layer.train(), params, state


@pytest.mark.parametrize("mode", ["plain", "reentrant", "non-reentrant"])
def test_activation_checkpointing_updates_the_statistics_once(mode):
    # SPEC §3.3: once per training step; the recomputation in the backward pass leaves them alone.
    from torch.utils.checkpoint import checkpoint

    layer, params, state = _issue_layer("float64")
    x = torch.from_numpy(STEP_X).requires_grad_()
    if mode == "plain":
        y = layer(x)
    else:
        y = checkpoint(layer, x, use_reentrant=mode == "reentrant")
    dy = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)
    (y * dy).sum().backward()
    ref_y, new_state, _ = peer_ref.forward(ISSUE_23, params, state, STEP_X, True)
    np.testing.assert_allclose(new_state["query_norm.mean"], [0.0724, 0.0065], atol=5e-5)
    for name, value in layer.named_buffers():
        np.testing.assert_allclose(value.numpy(), new_state[name], rtol=1e-12)
    grads, dx = peer_ref.vjp(ISSUE_23, params, state, STEP_X, dy.numpy(), True)
    np.testing.assert_allclose(y.detach().numpy(), ref_y, rtol=1e-12)
    np.testing.assert_allclose(x.grad.numpy(), dx, rtol=1e-10, atol=1e-12)
    for name, param in layer.named_parameters():
        np.testing.assert_allclose(param.grad.numpy(), grads[name], rtol=1e-10, atol=1e-12)


def test_checkpointed_steps_update_once_each():
    from torch.utils.checkpoint import checkpoint

    layer, params, state = _issue_layer("float64")
    for _ in range(3):
        checkpoint(layer, torch.from_numpy(STEP_X).requires_grad_(), use_reentrant=True).sum().backward()
        state = peer_ref.forward(ISSUE_23, params, state, STEP_X, True)[1]
    for name, value in layer.named_buffers():
        np.testing.assert_allclose(value.numpy(), state[name], rtol=1e-12)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_export_save_load_round_trip_with_dynamic_tokens(training, tmp_path):
    # torch.export → save → load → run equals eager, the buffer update of a training call included.
    cfg = COMPILED
    exported = be.layer(cfg, seed=0).train(training)
    eager = be.layer(cfg, seed=0).train(training)
    tokens = torch.export.Dim("tokens", min=2)
    program = torch.export.export(exported, (torch.randn(6, cfg.d_model),), dynamic_shapes=({0: tokens},))
    torch.export.save(program, tmp_path / "peer.pt2")
    loaded = torch.export.load(tmp_path / "peer.pt2").module()
    for count in (3, 11):
        x = torch.randn(count, cfg.d_model)
        torch.testing.assert_close(loaded(x), eager(x), rtol=1e-5, atol=1e-6)
        for name, value in eager.named_buffers():
            torch.testing.assert_close(loaded.get_buffer(name), value, rtol=1e-6, atol=1e-7)
    if training:
        assert not torch.equal(eager.get_buffer("query_norm.mean"), torch.zeros(cfg.d_key * cfg.heads))


def test_meta_device_build_allocates_nothing_on_the_host():
    # 128 MiB of tables: a meta build, seeded or not, computes none of them. Measured in a fresh
    # process: the peak of traced (NumPy) allocations, which the reference's tables would make,
    # and the growth of the resident memory, which torch's host tensors would make; a seeded CPU
    # build shows that both measurements see the tables.
    import subprocess
    import sys

    code = """
import os, sys, tracemalloc, torch
from peer_backends.torch import PEER
from peer_ref import PEERConfig
PEER(PEERConfig(d_model=8, n_experts=16, heads=1, topk=1, d_key=4), seed=0)  # imports and first calls
cfg = PEERConfig(d_model=256, n_experts=256**2, heads=1, topk=1, d_key=16)
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
before = rss()
tracemalloc.start()
module = PEER(cfg, device=sys.argv[1], seed=int(sys.argv[2]) if len(sys.argv) > 2 else None)
print(tracemalloc.get_traced_memory()[1] / 2**20, rss() - before)
"""

    def growth(*args):
        run = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
        return [float(v) for v in run.stdout.split()]

    for args in (("meta",), ("meta", "0")):
        assert max(growth(*args)) < 8, args
    traced, resident = growth("cpu", "0")
    assert traced > 64 and resident > 64, (traced, resident)


@pytest.mark.parametrize("seed", [None, 5])
def test_meta_build_then_to_empty_and_reset_equals_a_direct_build(seed):
    cfg = SEEDED
    module = be.layer(cfg, seed=seed, device="meta")
    assert all(p.is_meta for p in module.parameters())
    module.to_empty(device="cpu")
    torch.manual_seed(11)
    module.reset_parameters()
    torch.manual_seed(11)
    direct = be.layer(cfg, seed=seed)
    for name, value in direct.state_dict().items():
        assert torch.equal(module.state_dict()[name], value), name
