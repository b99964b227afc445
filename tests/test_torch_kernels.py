"""The torch backend's Triton kernels (implementation="triton") against its "aten" path.

Without a GPU the kernels run in Triton's interpreter: TRITON_INTERPRET=1 is set here before
triton is first imported, so this module runs in a process of its own (triton must not be
imported after tensorflow, nor before this module without the interpreter).
"""

import os
import sys

import pytest

if "tensorflow" in sys.modules:
    pytest.skip("triton cannot be imported after tensorflow in one process", allow_module_level=True)
if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("triton was imported before this module without TRITON_INTERPRET=1", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")
torch = pytest.importorskip("torch")

import peer_backends
import peer_ref
from peer_backends.torch import experts as torch_experts
from peer_backends.torch import kernels
from peer_backends.torch import peer as torch_peer
from peer_backends.torch.core import round_through
from peer_backends.torch.parallel import ExpertColumnParallel
from peer_ref import PEERConfig, PEERConfigError
from peer_ref.config import ACTIVATIONS

be = peer_backends.get("torch")


@pytest.fixture(autouse=True)
def _seeded():
    """Every test draws from a seeded generator: a failure reproduces."""
    torch.manual_seed(0)


# Odd sizes throughout (no power of two but heads*topk = 4 in one), every activation, GLU, bias.
CONFIGS = [
    PEERConfig(d_model=7, n_experts=16, heads=2, topk=3, d_key=4, d_out=5, activation="gelu", expert_bias=True),
    PEERConfig(
        d_model=9,
        n_experts=25,
        heads=1,
        topk=4,
        d_key=6,
        d_out=3,
        activation="gelu_tanh",
        expert_glu=True,
        score="sigmoid",
    ),
    PEERConfig(
        d_model=5,
        n_experts=9,
        heads=3,
        topk=2,
        d_key=2,
        d_out=11,
        activation="relu",
        expert_bias=True,
        expert_glu=True,
        shared_keys=False,
    ),
    PEERConfig(d_model=6, n_experts=4, heads=2, topk=2, d_key=4, activation="silu", query_norm="none"),
    PEERConfig(d_model=3, n_experts=1, heads=2, topk=1, d_key=2, d_out=1, activation="identity", expert_bias=True),
]


def _inputs(cfg, lead, dtype, seed=0):
    params, state = be.init(cfg, seed=seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    compute = getattr(torch, dtype)
    x = torch.randn(lead + (cfg.d_model,), generator=g, dtype=torch.float64).to(compute)
    dy = torch.randn(lead + (cfg.d_out,), generator=g, dtype=torch.float64).to(compute)
    mask = torch.rand(lead, generator=g) > 0.3
    return params, state, x, dy, mask


def _tolerance(dtype, compute_dtype=None):
    if compute_dtype is not None or dtype in ("bfloat16", "float16"):
        return {"rtol": 2e-2, "atol": 2e-2}
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == "float32" else {"rtol": 1e-11, "atol": 1e-11}


def _both(cfg, params, state, x, dy, **kwargs):
    return {
        name: (
            be.apply(cfg, params, state, x, **kwargs, implementation=name),
            be.vjp(cfg, params, state, x, dy, **kwargs, implementation=name),
        )
        for name in ("aten", "triton")
    }


def test_every_activation_is_covered():
    assert {cfg.activation for cfg in CONFIGS} == set(ACTIVATIONS) == set(kernels.ACTIVATION_CODES)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda cfg: cfg.activation)
def test_triton_equals_aten(cfg, dtype):
    params, state, x, dy, mask = _inputs(cfg, (2, 3), dtype)
    runs = _both(cfg, params, state, x, dy, training=True, mask=mask)
    (y_a, state_a, aux_a), (dp_a, dx_a) = runs["aten"]
    (y_t, state_t, aux_t), (dp_t, dx_t) = runs["triton"]
    tol = _tolerance(dtype)
    torch.testing.assert_close(y_t, y_a, **tol)
    torch.testing.assert_close(aux_t["indices"], aux_a["indices"])
    torch.testing.assert_close(dx_t, dx_a, **tol)
    assert set(dp_t) == set(dp_a)
    for name in dp_a:
        torch.testing.assert_close(dp_t[name], dp_a[name], **tol, msg=name)
        assert dp_t[name].dtype == dp_a[name].dtype, name
    for name in state_a:
        torch.testing.assert_close(state_t[name], state_a[name], **tol)


@pytest.mark.parametrize(
    ("dtype", "compute_dtype"), [("float32", "bfloat16"), ("float32", "float16"), ("bfloat16", None), ("float16", None)]
)
def test_triton_equals_aten_in_16_bits(dtype, compute_dtype):
    cfg = CONFIGS[2]  # GLU and bias
    params, state, x, dy, _ = _inputs(cfg, (5,), dtype)
    x, dy = x.to(getattr(torch, compute_dtype or dtype)), dy.to(getattr(torch, compute_dtype or dtype))
    runs = _both(cfg, params, state, x, dy, compute_dtype=compute_dtype)
    (y_a, _, _), (dp_a, dx_a) = runs["aten"]
    (y_t, _, _), (dp_t, dx_t) = runs["triton"]
    tol = _tolerance(dtype, compute_dtype)
    assert y_t.dtype == y_a.dtype and dx_t.dtype == dx_a.dtype
    torch.testing.assert_close(y_t, y_a, **tol)
    torch.testing.assert_close(dx_t, dx_a, **tol)
    for name in dp_a:
        assert dp_t[name].dtype == dp_a[name].dtype, name
        torch.testing.assert_close(dp_t[name], dp_a[name], **tol, msg=name)


def _stage_inputs(n, t, j, d_in, d_out, dtype, glu, bias, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(shape, generator=g, dtype=dtype).requires_grad_(True)

    indices = torch.randint(0, n, (t, j), generator=g)
    return dict(
        x=rand(t, d_in),
        indices=indices,
        weights=rand(t, j),
        down=rand(n, d_in),
        up=rand(n, d_out),
        bias=rand(n) if bias else None,
        gate=rand(n, d_in) if glu else None,
    )


def _einsum_stage(x, indices, weights, down, up, bias, gate, activation, low):
    # Rows rounded to low, the gradient passing unchanged (straight-through, SPEC §10.3).
    def read(table):
        return table if low is None else round_through(table, low)

    pre = torch.einsum("td,tjd->tj", x, read(down)[indices])
    if bias is not None:
        pre = pre + bias[indices]
    hidden = torch_experts.activation(activation, pre)
    if gate is not None:
        hidden = hidden * torch.einsum("td,tjd->tj", x, read(gate)[indices])
    return torch.einsum("tj,tjo->to", weights * hidden, read(up)[indices])


@pytest.mark.parametrize("blocks", ["interpreter", "gpu"])
@pytest.mark.parametrize("low", [None, torch.bfloat16])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_expert_stage_with_duplicates_equals_its_formula(activation, low, blocks, monkeypatch):
    # Three experts for 6 selections per token: every token selects some row twice or more.
    # With the GPU's block sizes (one token or run per program), columns wider than one block
    # (TILE_ELEMENTS // 8 = 512) exercise the column loops and their tails; runs longer than
    # SEGMENT_BLOCK the loops over selections.
    if blocks == "gpu":
        monkeypatch.setattr(kernels, "_interpreted", lambda device: False)
    args = _stage_inputs(3, 23, 6, 517, 9, torch.float64 if low is None else torch.float32, True, True)
    y = kernels.triton_experts(**args, activation=activation, low=low)
    expected = _einsum_stage(**args, activation=activation, low=low)
    tol = {"rtol": 1e-10, "atol": 1e-10} if low is None else {"rtol": 1e-4, "atol": 1e-3}
    torch.testing.assert_close(y, expected, **tol)
    leaves = [v for v in args.values() if v is not None and v.requires_grad]
    dy = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, leaves, dy), torch.autograd.grad(expected, leaves, dy)):
        torch.testing.assert_close(got, want, **tol)


def test_zero_tokens():
    cfg = CONFIGS[1]
    params, state, x, dy, _ = _inputs(cfg, (0, 3), "float32")
    y, _, aux = be.apply(cfg, params, state, x, implementation="triton")
    assert y.shape == (0, 3, cfg.d_out) and aux["indices"].shape == (0, 3, cfg.heads, cfg.topk)
    d_params, dx = be.vjp(cfg, params, state, x, dy, implementation="triton")
    assert dx.shape == x.shape
    for name, value in d_params.items():
        assert value.shape == params[name].shape and not value.any(), name


def test_routed_duplicates_and_zero_rows():
    # The same expert for every head of a token, and masked (zeroed) tokens: finite, equal to aten.
    cfg = CONFIGS[2]
    params, state, x, dy, mask = _inputs(cfg, (4,), "float64")
    routing = torch.tensor([3, 3, 7, 0, 8, 1]).reshape(1, 3, 2).repeat(4, 1, 1)
    routing[1] = 5
    runs = _both(cfg, params, state, x, dy, mask=mask, routing=routing)
    (y_a, _, _), (dp_a, dx_a) = runs["aten"]
    (y_t, _, _), (dp_t, dx_t) = runs["triton"]
    assert torch.isfinite(y_t).all() and torch.isfinite(dx_t).all()
    torch.testing.assert_close(y_t, y_a)
    torch.testing.assert_close(dx_t, dx_a)
    for name in dp_a:
        torch.testing.assert_close(dp_t[name], dp_a[name], msg=name)


def _assert_sparse_grads(sparse, dense, aten_sparse, **tol):
    """Row-sparse table gradients (SPEC §7.1) on "triton": coalesced COO, densified equal to
    the dense ones, with the rows and (within tol) the values of "aten"'s."""
    for name, grad in sparse.items():
        if name not in peer_ref.EXPERT_TABLES:
            torch.testing.assert_close(grad, dense[name], msg=name)
            continue
        assert grad.layout == torch.sparse_coo and grad.is_coalesced() and grad.dtype == dense[name].dtype, name
        torch.testing.assert_close(grad.to_dense(), dense[name], msg=name)
        assert torch.equal(grad.indices(), aten_sparse[name].indices()), name
        torch.testing.assert_close(grad.values(), aten_sparse[name].values(), **tol, msg=name)


@pytest.mark.parametrize("case", ["masked", "routing", "mixed", "no tokens"])
def test_sparse_table_gradients(case):
    cfg = CONFIGS[2]  # GLU, bias, relu
    params, state, x, dy, mask = _inputs(cfg, (0 if case == "no tokens" else 4, 3), "float64")
    kwargs = {"training": True, "mask": mask}
    if case == "routing":  # repeated experts in a token, a masked token's rows left out
        kwargs["routing"] = torch.tensor([3, 3, 7, 0, 8, 3]).reshape(1, 1, 3, 2).repeat(4, 3, 1, 1)
        kwargs["routing"][0, 0] = 5
        kwargs["mask"] = torch.ones(4, 3, dtype=torch.bool)
        kwargs["mask"][0, 0] = False
    if case == "mixed":
        params = {name: value.float() for name, value in params.items()}
        state = {name: value.float() for name, value in state.items()}
        x, dy = x.bfloat16(), dy.bfloat16()
        kwargs["compute_dtype"] = "bfloat16"
    dense, dx = be.vjp(cfg, params, state, x, dy, **kwargs, implementation="triton")
    sparse, dx_sparse = be.vjp(cfg, params, state, x, dy, **kwargs, implementation="triton", sparse=True)
    aten_sparse, _ = be.vjp(cfg, params, state, x, dy, **kwargs, implementation="aten", sparse=True)
    torch.testing.assert_close(dx_sparse, dx)
    _assert_sparse_grads(sparse, dense, aten_sparse, **_tolerance("float64", kwargs.get("compute_dtype")))
    if case == "no tokens":
        assert all(sparse[name]._nnz() == 0 for name in peer_ref.EXPERT_TABLES)
    if case == "routing":
        assert sparse["experts.up"].indices()[0].tolist() == [0, 3, 7, 8]


def test_gradients_are_deterministic():
    cfg = CONFIGS[0]
    params, state, x, dy, mask = _inputs(cfg, (6, 5), "float32")
    first = be.vjp(cfg, params, state, x, dy, training=True, mask=mask, implementation="triton")
    second = be.vjp(cfg, params, state, x, dy, training=True, mask=mask, implementation="triton")
    assert torch.equal(first[1], second[1])
    for name in first[0]:
        assert torch.equal(first[0][name], second[0][name]), name


def test_custom_ops_pass_opcheck():
    args = _stage_inputs(5, 3, 4, 6, 2, torch.float64, True, True)
    sample = (*args.values(), "silu", None)
    torch.library.opcheck(torch.ops.peer.triton_experts, sample)
    y, pre, gated = torch.ops.peer.triton_experts(*sample)
    detached = [v.detach() if isinstance(v, torch.Tensor) else v for v in sample[:-2]]
    torch.library.opcheck(
        torch.ops.peer.triton_experts_backward, (torch.randn_like(y), *detached, pre, gated, "silu", None, True, True)
    )


def test_compiled_module_on_triton_has_no_graph_breaks():
    from torch._dynamo.testing import CompileCounterWithBackend

    cfg = CONFIGS[0]
    torch._dynamo.reset()
    eager = be.layer(cfg, seed=1, implementation="triton").train(True)
    module = be.layer(cfg, seed=1, implementation="triton").train(True)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(module, backend=counter, fullgraph=True)
    for lead in [(2, 3), (3, 4)]:
        x = torch.randn(lead + (cfg.d_model,))
        torch._dynamo.mark_dynamic(x, [0, 1])
        y, y_eager = compiled(x), eager(x)
        torch.testing.assert_close(y, y_eager)
        y.square().sum().backward()
        y_eager.square().sum().backward()
    for (name, param), other in zip(module.named_parameters(), eager.parameters()):
        torch.testing.assert_close(param.grad, other.grad, msg=name)
    assert counter.frame_count == 1


def test_triton_without_a_device_is_refused(monkeypatch):
    cfg = CONFIGS[3]
    params, state, x, _, _ = _inputs(cfg, (2,), "float32")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(
        PEERConfigError,
        match=r"implementation='triton' is not available here: .*TRITON_INTERPRET=1"
        r".*available here: \['aten'\]",
    ):
        be.apply(cfg, params, state, x, implementation="triton")
    assert torch_peer.choose_implementation(None, "cpu") == "aten"
    module = be.layer(cfg, implementation="triton")
    with pytest.raises(PEERConfigError, match="TRITON_INTERPRET"):
        module(x)
    find_spec = torch_peer.importlib.util.find_spec
    monkeypatch.setattr(
        torch_peer.importlib.util, "find_spec", lambda name: None if name == "triton" else find_spec(name)
    )
    with pytest.raises(PEERConfigError, match="triton is not installed"):
        torch_peer.choose_implementation("triton", "cuda")
    assert torch_peer.choose_implementation(None, "cuda") == "aten"


def test_none_prefers_triton_on_cuda_devices():
    assert torch_peer.choose_implementation(None, "cuda") == "triton"
    assert torch_peer.choose_implementation(None, "cpu") == "aten"
    assert torch_peer.choose_implementation("triton", "cpu") == "triton"
    with pytest.raises(PEERConfigError, match="triton kernels run on CUDA devices, but x is on 'meta'"):
        torch_peer.choose_implementation("triton", "meta")


def test_layer_keyword(monkeypatch):
    cfg = CONFIGS[1]
    with pytest.raises(
        PEERConfigError, match=r"implementation='cuda', but backend 'torch' has \['aten', 'sharded', 'triton'\]"
    ):
        be.layer(cfg, implementation="cuda")
    module = be.layer(cfg, seed=3, implementation="triton")
    assert module.implementation == "triton" and "implementation='triton'" in repr(module)
    calls = []
    stage = kernels.expert_stage
    monkeypatch.setattr(kernels, "expert_stage", lambda *a, **k: calls.append(1) or stage(*a, **k))
    x = torch.randn(2, 3, cfg.d_model)
    y = module(x)
    assert calls == [1]
    reference = be.layer(cfg, seed=3, implementation="aten")
    torch.testing.assert_close(y, reference(x))
    assert calls == [1]
    assert be.layer(cfg).implementation is None


def test_sharded_layer_refuses_triton():
    module = be.layer(CONFIGS[0], implementation="triton")
    with pytest.raises(PEERConfigError, match="sharded expert tables run 'sharded'"):
        ExpertColumnParallel()._apply(module, None)


def test_importing_the_backend_does_not_import_triton():
    import subprocess

    code = "import sys, peer_backends.torch; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TRITON_INTERPRET": "0"})


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_torch_func_through_the_triton_layer(training):
    # Under a torch.func transform the triton layer runs the expert stage in plain operations
    # (experts.gathered_stage): gradients and per-sample gradients equal the aten layer's.
    from torch.func import functional_call, grad, vmap

    cfg = CONFIGS[0]
    layers = {name: be.layer(cfg, seed=3, implementation=name).train(training) for name in ("triton", "aten")}
    x, dy = torch.randn(6, cfg.d_model), torch.randn(6, cfg.d_out)
    grads = {}
    for name, layer in layers.items():
        p = {k: v.detach() for k, v in layer.named_parameters()}

        def loss(p, x, dy, layer=layer):
            return (functional_call(layer, p, (x,)) * dy).sum()

        grads[name] = grad(loss)(p, x, dy)
        if not training:
            grads[name + "/per-sample"] = vmap(grad(loss), in_dims=(None, 0, 0))(p, x[:, None], dy[:, None])
    for key in grads["aten"]:
        torch.testing.assert_close(grads["triton"][key], grads["aten"][key])
        if not training:
            torch.testing.assert_close(grads["triton/per-sample"][key], grads["aten/per-sample"][key])
            torch.testing.assert_close(grads["aten/per-sample"][key].sum(0), grads["aten"][key])
    torch.testing.assert_close(dict(layers["triton"].named_buffers()), dict(layers["aten"].named_buffers()))
