"""torch.func transforms (grad, vjp, jacrev, jacfwd, vmap of grad) through the torch layer, against
the reference in float64, in training and eval mode."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch.func import functional_call, grad, jacfwd, jacrev, vjp, vmap

import peer_ref
from peer_backends.torch import PEER
from peer_ref import PEERConfig
from peer_ref.errors import PEERInputError

ISSUE = PEERConfig(d_model=2, n_experts=1, heads=1, topk=1, d_key=2)
CONFIGS = {
    "issue": ISSUE,
    "wide": PEERConfig(d_model=4, n_experts=16, heads=2, topk=2, d_key=4, d_out=3),
    "glu_bias": PEERConfig(
        d_model=3,
        n_experts=9,
        heads=2,
        topk=2,
        d_key=4,
        expert_glu=True,
        expert_bias=True,
        activation="gelu",
        score="sigmoid",
    ),
    "own_keys": PEERConfig(d_model=3, n_experts=9, heads=2, topk=3, d_key=2, shared_keys=False),
}


def _layer(cfg, training, seed=0):
    layer = PEER(cfg, dtype="float64")
    params, state = peer_ref.init(cfg, seed=seed, dtype="float64")
    layer.load_params_and_state(
        {k: torch.from_numpy(v) for k, v in params.items()}, {k: torch.from_numpy(v) for k, v in state.items()}
    )
    return layer.train(training), params, state


def _inputs(cfg, lead, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(lead + (cfg.d_model,)), rng.standard_normal(lead + (cfg.d_out,))


def _close(actual, expected):
    np.testing.assert_allclose(actual.detach().numpy(), expected, rtol=1e-9, atol=1e-12)


def _check_grads(grads, expected):
    assert set(grads) == set(expected)
    for name, value in grads.items():
        _close(value, expected[name])


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_grad_and_vjp_equal_the_reference(name, training):
    cfg = CONFIGS[name]
    layer, params, state = _layer(cfg, training)
    x, dy = _inputs(cfg, (1,) if name == "issue" else (5,))
    if name == "issue":
        x = np.ones((1, 2))
    tx, tdy = torch.from_numpy(x), torch.from_numpy(dy)
    p = {k: v.detach() for k, v in layer.named_parameters()}
    expected, dx = peer_ref.vjp(cfg, params, state, x, dy, training)
    grads = grad(lambda p: (functional_call(layer, p, (tx,)) * tdy).sum())(p)
    _check_grads(grads, expected)
    y, pull = vjp(lambda p, x: functional_call(layer, p, (x,)), p, tx)
    ref_y, new_state, _ = peer_ref.forward(cfg, params, state, x, training)
    _close(y, ref_y)
    d_params, d_x = pull(tdy)
    _check_grads(d_params, expected)
    _close(d_x, dx)
    # Each training call (grad, then vjp) moved the statistics once, as the reference does.
    if training and cfg.query_norm == "batch":
        once = peer_ref.forward(cfg, params, new_state, x, True)[1]
        for key, value in layer.named_buffers():
            _close(value, once[key])


@pytest.mark.parametrize("transform", [jacrev, jacfwd])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_jacobians_equal_the_reference(transform, training):
    cfg = CONFIGS["glu_bias"]
    layer, params, state = _layer(cfg, training)
    x, _ = _inputs(cfg, (3,))
    p = {k: v.detach() for k, v in layer.named_parameters()}
    jac = transform(lambda x: functional_call(layer, p, (x,)))(torch.from_numpy(x))
    assert jac.shape == (3, cfg.d_out, 3, cfg.d_model)
    for t in range(3):
        for o in range(cfg.d_out):
            dy = np.zeros((3, cfg.d_out))
            dy[t, o] = 1.0
            _close(jac[t, o], peer_ref.vjp(cfg, params, state, x, dy, training)[1])


def _per_sample_reference(cfg, params, state, xs, dys, training, **kwargs):
    rows = [
        peer_ref.vjp(cfg, params, state, x, dy, training, **{k: v[i] for k, v in kwargs.items()})[0]
        for i, (x, dy) in enumerate(zip(xs, dys))
    ]
    return {name: np.stack([row[name] for row in rows]) for name in rows[0]}


@pytest.mark.parametrize("name", ["issue", "wide", "glu_bias"])
def test_per_sample_gradients_in_eval_mode(name):
    cfg = CONFIGS[name]
    layer, params, state = _layer(cfg, False)
    xs, dys = _inputs(cfg, (4, 3))
    p = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(p, x, dy):
        return (functional_call(layer, p, (x,)) * dy).sum()

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(p, torch.from_numpy(xs), torch.from_numpy(dys))
    _check_grads(grads, _per_sample_reference(cfg, params, state, xs, dys, False))


def test_per_sample_gradients_with_mask_and_routing_override():
    cfg = CONFIGS["wide"]
    layer, params, state = _layer(cfg, False)
    xs, dys = _inputs(cfg, (4, 3))
    rng = np.random.default_rng(2)
    mask = rng.random((4, 3)) < 0.7
    routing = rng.integers(0, cfg.n_experts, (4, 3, cfg.heads, cfg.topk))
    p = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(p, x, dy, m, r):
        return (functional_call(layer, p, (x,), {"mask": m, "routing": r}) * dy).sum()

    grads = vmap(grad(loss), in_dims=(None, 0, 0, 0, 0))(
        p, torch.from_numpy(xs), torch.from_numpy(dys), torch.from_numpy(mask), torch.from_numpy(routing)
    )
    _check_grads(grads, _per_sample_reference(cfg, params, state, xs, dys, False, mask=mask, routing=routing))


def test_per_sample_gradients_in_training_mode_without_batch_norm():
    cfg = PEERConfig(d_model=3, n_experts=9, heads=2, topk=2, d_key=4, query_norm="none")
    layer, params, state = _layer(cfg, True)
    xs, dys = _inputs(cfg, (4, 3))
    p = {k: v.detach() for k, v in layer.named_parameters()}
    grads = vmap(grad(lambda p, x, dy: (functional_call(layer, p, (x,)) * dy).sum()), in_dims=(None, 0, 0))(
        p, torch.from_numpy(xs), torch.from_numpy(dys)
    )
    _check_grads(grads, _per_sample_reference(cfg, params, state, xs, dys, True))


def test_training_mode_vmap_with_batch_norm_is_refused_clearly():
    layer, _, _ = _layer(ISSUE, True)
    before = {k: v.clone() for k, v in layer.named_buffers()}
    p = {k: v.detach() for k, v in layer.named_parameters()}
    with pytest.raises(PEERInputError, match=r"torch.func.vmap cannot update the batch-norm buffer.*eval mode"):
        vmap(grad(lambda p, x: functional_call(layer, p, (x,)).sum()), in_dims=(None, 0))(
            p, torch.ones(3, 2, 2, dtype=torch.float64)
        )
    for key, value in layer.named_buffers():
        assert torch.equal(value, before[key])


def test_buffers_passed_to_functional_call_are_updated_inside_the_transform():
    layer, params, state = _layer(ISSUE, True)
    x = np.array([[1.0, 0.0], [0.0, 3.0]])
    p = {k: v.detach() for k, v in layer.named_parameters()}
    buffers = {k: v.clone() for k, v in layer.named_buffers()}
    grad(lambda p, b: functional_call(layer, (p, b), (torch.from_numpy(x),)).sum())(p, buffers)
    expected = peer_ref.forward(ISSUE, params, state, x, True)[1]
    for key, value in buffers.items():
        _close(value, expected[key])


def test_layer_outside_transforms_still_runs_the_custom_operators():
    # The plain-op path is taken only under a transform: an ordinary call keeps the peer:: kernels.
    layer, _, _ = _layer(CONFIGS["wide"], True)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    seen, stack = set(), [y.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(n for n, _ in node.next_functions)
    names = {node.name() for node in seen}
    assert {
        "GeneratedBackwardFor_peer_up_projection_defaultBackward",
        "GeneratedBackwardFor_peer_selected_scores_defaultBackward",
    } <= names, names


def test_gradients_under_the_transform_equal_ordinary_autograd():
    cfg = CONFIGS["glu_bias"]
    layer, _, _ = _layer(cfg, False)
    x, dy = (torch.from_numpy(a) for a in _inputs(cfg, (6,)))
    (layer(x) * dy).sum().backward()
    p = {k: v.detach() for k, v in layer.named_parameters()}
    grads = grad(lambda p: (functional_call(layer, p, (x,)) * dy).sum())(p)
    for key, param in layer.named_parameters():
        torch.testing.assert_close(grads[key], param.grad, rtol=1e-12, atol=1e-14)
