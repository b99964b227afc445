"""The torch backend's row-sparse table gradients (``sparse=True``, SPEC §7.1) on "aten".

The "triton" path's are in test_torch_kernels.py (Triton's interpreter runs in a process of its
own), DDP's in test_torch_parallel.py.
"""

import numpy as np
import pytest

import peer_ref
from peer_ref import PEERConfig, PEERConfigError, PEERInputError

torch = pytest.importorskip("torch")
from torch.utils._python_dispatch import TorchDispatchMode

import peer_backends
from peer_backends.torch import peer as torch_peer

be = peer_backends.get("torch")

PLAIN = PEERConfig(d_model=6, n_experts=100, heads=2, topk=3, d_key=4, d_out=5, query_bias=True)
GLU_BIAS = PEERConfig(
    d_model=5, n_experts=81, heads=3, topk=2, d_key=4, activation="relu", expert_bias=True, expert_glu=True
)
CONFIGS = [PLAIN, GLU_BIAS]


def _inputs(cfg, lead=(3, 4), dtype="float64", seed=0):
    params, state = be.init(cfg, seed=seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(lead + (cfg.d_model,), generator=g, dtype=torch.float64).to(getattr(torch, dtype))
    dy = torch.randn(lead + (cfg.d_out,), generator=g, dtype=torch.float64).to(getattr(torch, dtype))
    mask = torch.rand(lead, generator=g) > 0.4
    return params, state, x, dy, mask


def _assert_within(actual, expected, tol):
    """SPEC §10.2's gradient rule: |a - b| <= atol * max(1, max|b|) + rtol * |b|."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    assert np.all(np.abs(actual - expected) <= tol.grad_atol * scale + tol.grad_rtol * np.abs(expected))


def _check_sparse(cfg, sparse_grads, dense_grads, reference, tol, n_rows=None):
    """Sparse gradients: coalesced COO of the tables only, densified equal to the dense ones,
    rows equal to the reference's and values within its tolerance."""
    assert sparse_grads.keys() == dense_grads.keys()
    for name, grad in sparse_grads.items():
        dense = dense_grads[name]
        if name not in peer_ref.EXPERT_TABLES:
            assert grad.layout == torch.strided, name
            torch.testing.assert_close(grad, dense, msg=name)
            continue
        assert grad.layout == torch.sparse_coo and grad.is_coalesced(), name
        assert grad.shape == dense.shape and grad.dtype == dense.dtype, name
        assert grad.sparse_dim() == 1 and grad.indices().dtype == torch.int64, name
        torch.testing.assert_close(grad.to_dense(), dense, msg=name)
        if reference is None:
            continue
        rows = be.to_numpy(grad)
        assert isinstance(rows, peer_ref.RowSparse)
        np.testing.assert_array_equal(rows.rows, reference[name].rows, err_msg=name)
        _assert_within(rows.values, reference[name].values, tol)


def _reference(cfg, params, state, x, dy, **kwargs):
    return peer_ref.vjp(cfg, be.to_numpy(params), be.to_numpy(state), be.to_numpy(x), be.to_numpy(dy), **kwargs)[0]


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("cfg", CONFIGS, ids=["plain", "glu_bias"])
def test_sparse_equals_dense_and_the_reference(cfg, masked, training):
    params, state, x, dy, mask = _inputs(cfg)
    mask = mask if masked else None
    kwargs = dict(training=training, mask=mask)
    dense, dx = be.vjp(cfg, params, state, x, dy, **kwargs)
    sparse, dx_sparse = be.vjp(cfg, params, state, x, dy, **kwargs, sparse=True)
    assert torch.equal(dx, dx_sparse)
    reference = _reference(
        cfg, params, state, x, dy, training=training, mask=None if mask is None else mask.numpy(), sparse=True
    )
    _check_sparse(cfg, sparse, dense, reference, peer_ref.TOLERANCES["float64"])
    if masked:  # padding touches no row: an expert selected only by masked tokens is not listed
        _, _, aux = be.apply(cfg, params, state, x, training, mask)
        listed = set(sparse["experts.down"].indices()[0].tolist())
        assert listed == set(aux["indices"][mask].reshape(-1).tolist())
        assert listed != set(aux["indices"].reshape(-1).tolist())  # the inputs do mask some rows out


def test_routing_override_with_repeated_experts():
    cfg = GLU_BIAS
    params, state, x, dy, mask = _inputs(cfg, lead=(5,))
    routing = torch.tensor([[[3, 3]] * 3, [[0, 35]] * 3, [[7, 3]] * 3, [[35, 35]] * 3, [[1, 2]] * 3])
    mask = torch.tensor([True, True, True, False, True])
    dense, _ = be.vjp(cfg, params, state, x, dy, mask=mask, routing=routing)
    sparse, _ = be.vjp(cfg, params, state, x, dy, mask=mask, routing=routing, sparse=True)
    reference = _reference(cfg, params, state, x, dy, mask=mask.numpy(), routing=routing.numpy(), sparse=True)
    _check_sparse(cfg, sparse, dense, reference, peer_ref.TOLERANCES["float64"])
    assert sparse["experts.up"].indices()[0].tolist() == [0, 1, 2, 3, 7, 35]


@pytest.mark.parametrize(
    ("dtype", "compute_dtype"), [("float32", "bfloat16"), ("float32", "float16"), ("bfloat16", None)]
)
def test_16_bit_and_mixed_mode(dtype, compute_dtype):
    cfg = GLU_BIAS
    params, state, x, dy, mask = _inputs(cfg, dtype=dtype)
    low = getattr(torch, compute_dtype or dtype)
    x, dy = x.to(low), dy.to(low)
    kwargs = dict(training=True, mask=mask, compute_dtype=compute_dtype)
    dense, dx = be.vjp(cfg, params, state, x, dy, **kwargs)
    sparse, dx_sparse = be.vjp(cfg, params, state, x, dy, **kwargs, sparse=True)
    torch.testing.assert_close(dx_sparse, dx)
    reference = None  # the reference takes float64 and float32 parameters
    if dtype == "float32":
        reference = _reference(
            cfg, params, state, x, dy, training=True, mask=mask.numpy(), compute_dtype=compute_dtype, sparse=True
        )
    _check_sparse(cfg, sparse, dense, reference, peer_ref.TOLERANCES[compute_dtype or dtype])
    assert sparse["experts.down"].dtype == getattr(torch, dtype)  # float32 in the mixed mode


def test_zero_tokens_list_no_row():
    cfg = GLU_BIAS
    params, state, x, dy, _ = _inputs(cfg, lead=(0,))
    sparse, dx = be.vjp(cfg, params, state, x, dy, sparse=True)
    assert dx.shape == (0, cfg.d_model)
    for name in peer_ref.EXPERT_TABLES:
        assert sparse[name].is_coalesced() and sparse[name]._nnz() == 0 and sparse[name].shape == params[name].shape
        assert be.to_numpy(sparse[name]).rows.shape == (0,)


@pytest.mark.parametrize("value", [1, "yes", None])
def test_a_sparse_that_is_not_a_bool_is_refused(value):
    params, state, x, dy, _ = _inputs(PLAIN)
    message = f"sparse={value!r}, but expected a bool"
    with pytest.raises(PEERInputError, match=message):
        be.vjp(PLAIN, params, state, x, dy, sparse=value)
    with pytest.raises(PEERInputError, match=message):
        be.PEER(PLAIN, sparse=value)


def test_where_sparse_gradients_cannot_run_they_are_refused():
    params, state, x, dy, _ = _inputs(PLAIN)
    with pytest.raises(PEERConfigError, match=r"sparse=True with jit=True, but expected jit=None or False"):
        be.vjp(PLAIN, params, state, x, dy, sparse=True, jit=True)
    with pytest.raises(PEERConfigError, match=r"sparse=True with expert tables sharded as DTensors"):
        torch_peer.check_sparse(True, "sharded")
    layer = be.PEER(PLAIN, seed=0, sparse=True)
    tables = dict(layer.named_parameters())

    def loss(p):
        return torch.func.functional_call(layer, p, (x.float(),)).sum()

    with pytest.raises(PEERConfigError, match="sparse=True under a torch.func transform"):
        torch.func.grad(loss)(tables)
    with torch.no_grad():  # no gradient, no sparse path: a transform-free inference call runs
        layer(x.float())


def _layers(cfg, **kwargs):
    torch.manual_seed(0)
    return be.PEER(cfg, seed=1, sparse=True, **kwargs), be.PEER(cfg, seed=1, **kwargs)


def _backward(layer, x, mask=None):
    y = layer(x, mask=mask)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()


def test_layer_sparse_grads_accumulate_and_clip_like_the_dense_ones():
    sparse, dense = _layers(GLU_BIAS)
    assert "sparse=True" in repr(sparse) and "sparse=False" in repr(dense)
    names = [name for name, _ in sparse.named_parameters()]
    assert [
        p is q
        for p, q in zip(
            sparse.sparse_parameters(), (sparse.get_parameter(n) for n in names if n.startswith("experts."))
        )
    ]
    assert {id(p) for p in sparse.sparse_parameters()} | {id(p) for p in sparse.dense_parameters()} == {
        id(p) for p in sparse.parameters()
    }
    assert len(list(sparse.sparse_parameters())) == 4
    assert sparse.state_dict().keys() == dense.state_dict().keys()  # the canonical names
    sparse.load_state_dict(dense.state_dict())
    assert isinstance(sparse.experts, torch.nn.EmbeddingBag) and sparse.experts.sparse  # what DDP looks for
    x = torch.randn(4, 3, GLU_BIAS.d_model)
    mask = torch.rand(4, 3) > 0.3
    for layer in (sparse, dense):
        layer.train()
        _backward(layer, x, mask)
    assert sparse.experts.down.grad.is_coalesced()
    for layer in (sparse, dense):
        _backward(layer, x[:2])
    for (name, p), q in zip(sparse.named_parameters(), dense.parameters()):
        if name in peer_ref.EXPERT_TABLES:
            # AccumulateGrad adds the second sparse gradient; coalesced or not, it is the dense sum's.
            assert p.grad.layout == torch.sparse_coo, name
            torch.testing.assert_close(p.grad.coalesce().to_dense(), q.grad, msg=name)
        else:
            torch.testing.assert_close(p.grad, q.grad, msg=name)
    # clip_grad_norm_ takes no sparse gradient: the norm of the coalesced values, then
    # clip_grads_with_norm_, clips as clip_grad_norm_ clips the dense gradients.
    norm = torch.nn.utils.get_total_norm(
        [p.grad.coalesce().values() if p.grad.is_sparse else p.grad for p in sparse.parameters()]
    )
    torch.nn.utils.clip_grads_with_norm_(sparse.parameters(), 0.5, norm)
    dense_norm = torch.nn.utils.clip_grad_norm_(dense.parameters(), 0.5)
    torch.testing.assert_close(norm, dense_norm)
    assert norm > 0.5
    for p, q in zip(sparse.parameters(), dense.parameters()):
        torch.testing.assert_close(p.grad.to_dense(), q.grad)


def test_sparse_adam_touches_the_listed_rows_only():
    sparse, _ = _layers(GLU_BIAS)
    before = {name: p.detach().clone() for name, p in sparse.named_parameters()}
    optimizers = [
        torch.optim.SparseAdam(list(sparse.sparse_parameters()), lr=0.1),
        torch.optim.AdamW(sparse.dense_parameters(), lr=0.1),
    ]
    x = torch.randn(3, GLU_BIAS.d_model)
    _backward(sparse, x)
    grads = {name: p.grad for name, p in sparse.named_parameters()}
    for optimizer in optimizers:
        optimizer.step()
    for name, p in sparse.named_parameters():
        if name not in peer_ref.EXPERT_TABLES:
            assert not torch.equal(p.detach(), before[name]), name
            continue
        moved = set((p.detach() != before[name]).reshape(p.shape[0], -1).any(dim=1).nonzero()[:, 0].tolist())
        values = grads[name].values().reshape(grads[name]._nnz(), -1)
        rows = grads[name].indices()[0]
        # Every row with a nonzero gradient moves, and only listed rows move (the first step of
        # Adam moves a row by its gradient's sign: zero values, relu' = 0, leave it).
        assert set(rows[values.ne(0).any(dim=1)].tolist()) <= moved <= set(rows.tolist()), name
        assert len(moved) > 0


@pytest.mark.filterwarnings("ignore:Sparse invariant checks are implicitly disabled")
@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adagrad])
def test_sgd_and_adagrad_take_the_same_step_from_either_form(optimizer):
    sparse, dense = _layers(PLAIN)
    x = torch.randn(6, PLAIN.d_model)
    for layer in (sparse, dense):
        opt = optimizer(layer.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            _backward(layer, x)
            opt.step()
    for (name, p), q in zip(sparse.named_parameters(), dense.parameters()):
        torch.testing.assert_close(p, q, msg=name)


def test_autocast_sparse_grads_equal_the_dense_ones():
    sparse, dense = _layers(GLU_BIAS)
    x = torch.randn(5, GLU_BIAS.d_model)
    for layer in (sparse, dense):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        (y.float() * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    for (name, p), q in zip(sparse.named_parameters(), dense.parameters()):
        assert p.grad.dtype == torch.float32, name
        if name in peer_ref.EXPERT_TABLES:
            assert p.grad.is_sparse and p.grad.is_coalesced(), name
        torch.testing.assert_close(p.grad.to_dense(), q.grad, msg=name)


def test_compiled_layer_gives_the_eager_sparse_grads():
    eager, _ = _layers(PLAIN)
    compiled, _ = _layers(PLAIN)
    x = torch.randn(4, PLAIN.d_model)
    _backward(eager, x)
    _backward(torch.compile(compiled, backend="aot_eager"), x)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        assert p.grad.layout == q.grad.layout, name
        torch.testing.assert_close(q.grad.to_dense(), p.grad.to_dense(), msg=name)


class _LargestOutputs(TorchDispatchMode):
    """Records the number of elements of every tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in torch.utils._pytree.tree_leaves(out):
            if isinstance(value, torch.Tensor):
                self.sizes.append((value.numel() if value.layout == torch.strided else value._nnz(), str(func)))
        return out


def test_a_sparse_step_creates_no_tensor_of_n_rows():
    """At N = 1024**2 the sparse forward and backward create no tensor with N / 16 or more
    elements (no (N, d) gradient, no O(N) grouping); the dense step, checked the same way, does."""
    cfg = PEERConfig(d_model=4, n_experts=1024**2, heads=2, topk=2, d_key=4, expert_bias=True)
    torch.manual_seed(0)
    x = torch.randn(8, cfg.d_model)
    largest = {}
    for sparse in (True, False):
        layer = be.PEER(cfg, sparse=sparse)
        with _LargestOutputs() as record:
            _backward(layer, x)
        largest[sparse] = max(record.sizes)
    # The largest are the routing's sub-key scores, (T, heads, 2, sqrt(N)) = 32768 elements.
    assert largest[True][0] < cfg.n_experts // 16, largest[True]
    assert largest[False][0] >= cfg.n_experts, largest[False]
    assert layer.experts.down.grad.layout == torch.strided  # the dense step's


def test_the_selected_rows_and_their_operators():
    from peer_backends.torch import experts

    indices = torch.tensor([[3, 1, 3], [0, 7, 1], [5, 5, 2]])
    valid = torch.tensor([True, False, True])
    selected = experts.selected_rows(indices, 8, valid)
    # The valid tokens' experts first (the gradient's rows), then the masked token's.
    assert selected.rows.tolist() == [1, 2, 3, 5, 0, 1, 7] and selected.listed == 4
    assert torch.equal(selected.rows[selected.compact], indices)
    assert selected.groups.offsets.shape == (7,)  # one group per selected row, never N
    table = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    taken = experts.take_rows(table, selected)
    assert torch.equal(taken, table[selected.rows])
    (grad,) = torch.autograd.grad(taken, table, torch.ones_like(taken))
    assert grad.is_coalesced() and grad.indices()[0].tolist() == [1, 2, 3, 5]
    for mask in (None, valid):
        torch.library.opcheck(torch.ops.peer.selected_rows, (indices, 8, mask))
    torch.library.opcheck(torch.ops.peer.take_rows, (table, selected.rows, selected.listed))


def test_a_copied_layer_gives_coalesced_grads():
    import copy

    layer = copy.deepcopy(_layers(PLAIN)[0])  # new tensors: the forward hooks them again
    _backward(layer, torch.randn(3, PLAIN.d_model))
    for table in layer.sparse_parameters():
        assert table.grad.is_sparse and table.grad.is_coalesced()
