"""The PEER-pytorch adapter (peer_conformance.adapters.peer_pytorch) and the divergences its
verdict reports, each shown on PEER-pytorch itself by the minimal input that the guide
(docs/conformance/test-your-own-peer.md) quotes."""

import numpy as np
import pytest

import peer_ref
from peer_backends import options
from peer_ref import PEERConfig

torch = pytest.importorskip("torch")
pytest.importorskip("PEER_pytorch")

from PEER_pytorch import PEER

from peer_conformance.adapters import peer_pytorch as adapter

CFG = PEERConfig(
    d_model=8,
    n_experts=16,
    heads=2,
    topk=3,
    d_key=4,
    shared_keys=False,
    query_norm="none",
    expert_bias=False,
    activation="silu",
)


def test_adapter_computes_the_reference_on_a_supported_config():
    """Names and layouts map exactly: float64 forward, routing and gradients equal the reference's."""
    params, _ = adapter.init(CFG, seed=0, dtype="float64")
    numpy_params = adapter.to_numpy(params)
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal((2, 3, 8)), rng.standard_normal((2, 3, 8))
    y, state, aux = adapter.to_numpy(adapter.apply(CFG, params, {}, torch.tensor(x)))
    y_ref, _, aux_ref = peer_ref.forward(CFG, numpy_params, {}, x)
    assert state == {} and np.array_equal(aux["indices"], aux_ref["indices"])
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(aux["weights"], aux_ref["weights"], rtol=1e-12, atol=1e-12)
    grads, dx = adapter.to_numpy(adapter.vjp(CFG, params, {}, torch.tensor(x), torch.tensor(dy)))
    grads_ref, dx_ref = peer_ref.vjp(CFG, numpy_params, {}, x, dy)
    assert set(grads) == set(grads_ref)
    for name in grads_ref:
        np.testing.assert_allclose(grads[name], grads_ref[name], rtol=1e-10, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-10, atol=1e-12)


def test_adapter_declares_options_the_suite_accepts_and_refuses_the_rest():
    table = options.supported(adapter)
    assert table["shared_keys"] == (False,) and table["activation"] == peer_ref.ACTIVATIONS
    with pytest.raises(peer_ref.PEERConfigError, match="shared_keys=True"):
        adapter.init(
            PEERConfig(d_model=8, n_experts=16, heads=2, topk=3, d_key=4, query_norm="none", expert_bias=False)
        )


def test_init_leaves_torch_global_generator_alone():
    before = torch.random.get_rng_state()
    adapter.init(CFG, seed=3)
    assert torch.equal(before, torch.random.get_rng_state())


# --- the divergences of its verdict, each on its smallest input -------------------------------


def _peer(n_keys=2, topk=1):
    """A one-head PEER-pytorch layer on 2 features whose query halves are x's two coordinates."""
    layer = PEER(
        dim=2, heads=1, num_experts=n_keys**2, num_experts_per_head=topk, dim_key=1, non_competing_scores=False
    )
    with torch.no_grad():
        layer.to_queries[0].weight.copy_(torch.eye(2))
    return layer


def _routed(layer, x):
    seen = {}
    hook = layer.weight_down_embed.register_forward_hook(lambda module, args, out: seen.update(indices=args[0]))
    y = layer(x)
    hook.remove()
    return y, seen["indices"].flatten().tolist()


def test_zero_tokens_raise():
    """SPEC §6: zero tokens give a (0, d_model) output."""
    layer = PEER(dim=8, heads=2, num_experts=16, num_experts_per_head=3, dim_key=2, non_competing_scores=False)
    with pytest.raises(Exception, match="Failed to determine the size of all axes") as error:
        layer(torch.zeros(1, 0, 8))
    assert type(error.value).__name__ == "AxisSizeError"


def test_exact_ties_do_not_go_to_the_lower_index():
    """SPEC §4.1: four experts tie (every sub-key 0); the top-2 is experts [0, 1]."""
    layer = _peer(n_keys=2, topk=2)
    with torch.no_grad():
        layer.keys.zero_()
    _, indices = _routed(layer, torch.ones(1, 1, 2))
    assert indices == [2, 3]


def test_nan_sub_key_is_preferred():
    """SPEC §4.1, §9.2: left sub-keys [1, NaN], right [1, 0], x = [1, 1]: expert 0 scores 2 and is
    chosen; experts 2 and 3 score NaN."""
    layer = _peer(n_keys=2, topk=1)
    with torch.no_grad():
        layer.keys.copy_(torch.tensor([[[[1.0], [1.0]], [[float("nan")], [0.0]]]]))
    y, indices = _routed(layer, torch.ones(1, 1, 2))
    assert indices == [2] and torch.isnan(y).all()


def test_bad_input_raises_no_value_error():
    """SPEC §9.1: x of the wrong width is refused with a ValueError naming x."""
    layer = PEER(dim=8, heads=2, num_experts=16, num_experts_per_head=3, dim_key=2, non_competing_scores=False)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        layer(torch.zeros(1, 3, 6))


def test_low_precision_scores_stay_in_low_precision():
    """SPEC §10.1: with bfloat16 parameters, routing scores and weights are float32."""
    layer = _peer(n_keys=2, topk=1).to(torch.bfloat16)
    seen = {}
    layer.score_activation.register_forward_hook(lambda module, args, out: seen.update(scores=args[0]))
    layer(torch.ones(1, 1, 2, dtype=torch.bfloat16))
    assert seen["scores"].dtype == torch.bfloat16


def test_initialisation_is_its_own():
    """SPEC §8: keys have std 1/sqrt(d_key/2) (here 0.25), experts.up 1/sqrt(heads·topk) (here 0.18)."""
    torch.manual_seed(0)
    layer = PEER(dim=64, heads=4, num_experts=32**2, num_experts_per_head=8, dim_key=16, non_competing_scores=False)
    assert abs(float(layer.keys.detach().std()) - 0.02) < 0.002
    assert abs(float(layer.weight_up_embed.weight.detach().std()) - 1.0) < 0.02
