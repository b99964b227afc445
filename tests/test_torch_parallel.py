"""ExpertColumnParallel on 2 and 4 gloo processes (loopback only) against one device.

Each test spawns its processes (torch.multiprocessing, spawn start) with a free port on
127.0.0.1; a failed check in any rank fails the test with that rank's traceback.
"""

import contextlib
import copy
import dataclasses
import os
import socket

import pytest

from peer_ref import PEERConfig, PEERConfigError, PEERInputError

torch = pytest.importorskip("torch")
import torch.distributed as dist
import torch.multiprocessing as mp

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import parallelize_module

import peer_backends
from peer_backends.torch.layer import PEER
from peer_backends.torch.parallel import (
    ExpertColumnParallel,
    gather_params_and_state,
    load_params_and_state,
)

# d_model 12 and d_out 8 split evenly over 2 and 4 devices; 10 is split unevenly over 4.
CFG = PEERConfig(d_model=12, n_experts=49, heads=3, topk=4, d_key=6, d_out=8, query_bias=True)
UNEVEN = PEERConfig(
    d_model=10, n_experts=36, heads=2, topk=3, d_key=4, shared_keys=False, activation="silu", score="sigmoid"
)
# GLU experts (SPEC §3.10): experts.gate is sharded like experts.down, its dots reduced with them.
GLU = dataclasses.replace(CFG, expert_glu=True)
UNEVEN_GLU = dataclasses.replace(UNEVEN, expert_glu=True)
TOL = dict(rtol=1e-10, atol=1e-10)


class CommSizes(CommDebugMode):
    """CommDebugMode that also keeps (op, elements) of every collective run outside DTensor dispatch."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(getattr(func, "_overloadpacket", func))
        if (
            DTensor not in types
            and name.startswith(("_c10d_functional.", "c10d."))
            and any(op in name for op in ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all"))
        ):
            numel = max((a.numel() for a in args if isinstance(a, torch.Tensor)), default=0)
            self.sizes.append((name, numel))
        return super().__torch_dispatch__(func, types, args, kwargs)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world, *args):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(_free_port())
    mp.spawn(_entry, args=(world, fn, args), nprocs=world, join=True)


def _entry(rank, world, fn, args):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _chunk(size, parts, index):
    """The length of torch.chunk's piece ``index`` (DTensor's and FSDP's uneven split)."""
    pieces = torch.arange(size).chunk(parts)
    return len(pieces[index]) if index < len(pieces) else 0


def _inputs(cfg, seed, lead=(2, 5)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(lead + (cfg.d_model,), generator=g, dtype=torch.float64)
    mask = torch.rand(lead, generator=g) > 0.3
    dy = torch.randn(lead + (cfg.d_out,), generator=g, dtype=torch.float64)
    return x, mask, dy


def _step(module, x, mask, dy, comm=None):
    """One forward and backward: (y, new buffers, parameter gradients, x gradient).

    Only the step itself runs under ``comm``, not the test's gathering of the gradients.
    """
    x = x.detach().requires_grad_(True)
    with comm or contextlib.nullcontext():
        y = module(x, mask=mask)
        (y * dy).sum().backward()
    grads = {
        n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
        for n, p in module.named_parameters()
    }
    buffers = {n: b.clone() for n, b in module.named_buffers()}
    module.zero_grad(set_to_none=True)
    return y.detach(), buffers, grads, x.grad


def _assert_step_equal(actual, expected):
    for a, e in zip(actual, expected):
        if isinstance(e, dict):
            assert a.keys() == e.keys()
            for name in e:
                torch.testing.assert_close(a[name], e[name], **TOL, msg=name)
        else:
            torch.testing.assert_close(a, e, **TOL)


def _equal_to_one_device(rank, world, cfg):
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    reference = PEER(cfg, seed=3, dtype="float64")
    sharded = parallelize_module(copy.deepcopy(reference), mesh, ExpertColumnParallel())
    # Per-device table memory is 1/P: each rank holds its chunk of columns, all N rows.
    tables = ("experts.down", "experts.gate", "experts.up") if cfg.expert_glu else ("experts.down", "experts.up")
    assert {n for n, p in sharded.named_parameters() if p.placements == (Shard(1),)} == set(tables)
    for name in tables:
        local = sharded.get_parameter(name).to_local()
        width = reference.get_parameter(name).shape[1]
        assert local.shape == (cfg.n_experts, _chunk(width, world, rank)), name
        assert sharded.get_parameter(name).placements == (Shard(1),)
    assert sharded.experts.bias.placements == (Replicate(),)

    for training in (True, False, True):  # two training steps: the running statistics move twice
        reference.train(training)
        sharded.train(training)
        x, mask, dy = _inputs(cfg, seed=10 + training)
        comm = CommSizes()
        got = _step(sharded, x, mask, dy, comm)
        _assert_step_equal(got, _step(reference, x, mask, dy))
        # Collectives carry T*heads*topk dots or T*d activations, never an (N, d) table.
        tokens = x.shape[0] * x.shape[1]
        dots = tokens * cfg.heads * cfg.topk
        counts = {str(op).lstrip("_"): n for op, n in comm.get_comm_counts().items()}
        # forward: the partial dots' all-reduce (down and, stacked with them, gate: 2*T*h*k),
        # the output's all-gather; backward: the coefficient gradient's all-reduce, the x
        # gradient's all-gather.
        assert counts == {"c10d_functional.all_reduce": 2, "c10d_functional.all_gather_into_tensor": 2}, counts
        reduced = [n for op, n in comm.sizes if "all_reduce" in op]
        assert reduced == [(2 if cfg.expert_glu else 1) * dots, dots], comm.sizes
        gathered = [n for op, n in comm.sizes if "all_gather" in op]
        assert len(gathered) == 2 and all(0 < n <= tokens * max(cfg.d_model, cfg.d_out) for n in gathered), comm.sizes


def _shard_output_and_checkpoint(rank, world, path):
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    reference = PEER(CFG, seed=5, dtype="float64").train()
    style = ExpertColumnParallel(output_layouts=Shard(-1))
    sharded = parallelize_module(copy.deepcopy(reference), mesh, style).train()
    x, mask, dy = _inputs(CFG, seed=1)
    y_local = sharded(x, mask=mask)
    assert type(y_local) is torch.Tensor and y_local.shape == (2, 5, CFG.d_out // world)
    y_ref = reference(x, mask=mask)
    torch.testing.assert_close(y_local, y_ref.tensor_split(world, dim=-1)[rank], **TOL)
    # Gradients through a sharded output (use_local_output=False: a DTensor Shard(-1)).
    as_dtensor = parallelize_module(
        copy.deepcopy(reference), mesh, ExpertColumnParallel(output_layouts=Shard(-1), use_local_output=False)
    )
    y_dt = as_dtensor(x, mask=mask)
    assert y_dt.placements == (Shard(2),)

    # Given routing, and bfloat16 (stored in bfloat16, computed in float32: SPEC §10).
    routing = torch.randint(0, CFG.n_experts, (2, 5, CFG.heads, CFG.topk), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(
        sharded.eval()(x, routing=routing),  # its local Shard(-1) output
        reference.eval()(x, routing=routing).tensor_split(world, dim=-1)[rank],
        **TOL,
    )
    half = PEER(CFG, seed=5, dtype="bfloat16").train()
    half_sharded = parallelize_module(copy.deepcopy(half), mesh, ExpertColumnParallel()).train()
    got = _step(half_sharded, x.bfloat16(), mask, dy.bfloat16())
    expected = _step(half, x.bfloat16(), mask, dy.bfloat16())
    for a, e in zip(got, expected):
        for name in e if isinstance(e, dict) else [None]:
            actual, wanted = (a[name], e[name]) if name else (a, e)
            assert actual.dtype == wanted.dtype, name
            torch.testing.assert_close(actual.float(), wanted.float(), rtol=2e-2, atol=2e-2, msg=name)
    sharded.train()
    reference.train()

    # Mixed precision (SPEC §10.3) runs sharded: under torch.autocast a float32 layer reads x and the
    # expert rows in the low dtype, like the one-device layer; so does the functional API's compute_dtype.
    single = PEER(CFG, seed=6).train()
    single_sharded = parallelize_module(copy.deepcopy(single), mesh, ExpertColumnParallel()).train()
    functional = peer_backends.get("torch")
    for low in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=low):
            got = _step(single_sharded, x.float(), mask, dy.to(low))
            expected = _step(single, x.float(), mask, dy.to(low))
        for a, e in zip(got, expected):
            for name in e if isinstance(e, dict) else [None]:
                actual, wanted = (a[name], e[name]) if name else (a, e)
                assert actual.dtype == wanted.dtype, name
                torch.testing.assert_close(actual.float(), wanted.float(), rtol=1e-2, atol=1e-2, msg=name)
        assert got[0].dtype == low
        sharded_params, sharded_state = single_sharded.params_and_state()
        whole_params, whole_state = single.params_and_state()
        y_sharded, _, aux = functional.apply(
            CFG, sharded_params, sharded_state, x.to(low), mask=mask, compute_dtype=low
        )
        y_whole, _, aux_whole = functional.apply(
            CFG, whole_params, whole_state, x.to(low), mask=mask, compute_dtype=low
        )
        assert isinstance(y_sharded, DTensor) and y_sharded.placements == (Shard(2),)
        with pytest.raises(PEERConfigError, match="the expert tables are sharded DTensors, which run 'sharded'"):
            functional.apply(CFG, sharded_params, sharded_state, x.to(low), compute_dtype=low, implementation="aten")
        torch.testing.assert_close(aux["indices"], aux_whole["indices"], rtol=0, atol=0)
        torch.testing.assert_close(y_sharded.full_tensor().float(), y_whole.float(), rtol=1e-2, atol=1e-2)
        grads, dx = functional.vjp(
            CFG, sharded_params, sharded_state, x.to(low), dy.to(low), mask=mask, compute_dtype=low
        )
        grads_whole, dx_whole = functional.vjp(
            CFG, whole_params, whole_state, x.to(low), dy.to(low), mask=mask, compute_dtype=low
        )
        torch.testing.assert_close(dx.float(), dx_whole.float(), rtol=1e-2, atol=1e-2)
        for name, value in grads.items():
            full = value.full_tensor() if isinstance(value, DTensor) else value
            assert full.dtype == torch.float32, name
            torch.testing.assert_close(full, grads_whole[name], rtol=1e-2, atol=1e-2, msg=name)

    # Checkpoint: gather on every rank, write on rank 0, load the whole file into a sharded layer.
    with pytest.raises(PEERInputError, match="gather_params_and_state"):
        peer_backends.save(path + ".refused", CFG, *sharded.params_and_state())
    params, state = gather_params_and_state(sharded)
    if rank == 0:
        peer_backends.save(path, CFG, params, state)
    dist.barrier()
    cfg, loaded_params, loaded_state = peer_backends.load(path, backend="torch")
    fresh = parallelize_module(PEER(CFG, seed=9, dtype="float64"), mesh, ExpertColumnParallel()).eval()
    load_params_and_state(fresh, loaded_params, loaded_state)
    for name, value in gather_params_and_state(fresh)[0].items():
        torch.testing.assert_close(value, reference.get_parameter(name), rtol=0, atol=0, msg=name)
    for name, value in fresh.named_buffers():
        torch.testing.assert_close(value, reference.get_buffer(name), rtol=0, atol=0, msg=name)
    torch.testing.assert_close(fresh(x, mask=mask), reference.eval()(x, mask=mask), **TOL)
    with pytest.raises(PEERInputError, match="expected float64"):
        load_params_and_state(
            fresh, {k: v.float() for k, v in loaded_params.items()}, {k: v.float() for k, v in loaded_state.items()}
        )

    # torch.distributed.checkpoint saves and loads the DTensor state_dict shard by shard.
    import torch.distributed.checkpoint as dcp

    dcp.save(sharded.state_dict(), checkpoint_id=path + ".dcp")
    other = parallelize_module(PEER(CFG, seed=11, dtype="float64"), mesh, ExpertColumnParallel())
    restored = other.state_dict()
    dcp.load(restored, checkpoint_id=path + ".dcp")
    other.load_state_dict(restored)
    for name, value in gather_params_and_state(other)[0].items():
        torch.testing.assert_close(value, reference.get_parameter(name), rtol=0, atol=0, msg=name)

    # Bad uses are refused with the argument named.
    with pytest.raises(PEERInputError, match="output_layouts"):
        ExpertColumnParallel(output_layouts=Shard(0))
    with pytest.raises(PEERInputError, match="expected a peer_backends.torch PEER layer"):
        parallelize_module(torch.nn.Linear(2, 2), mesh, ExpertColumnParallel())
    narrow = PEERConfig(d_model=12, n_experts=16, heads=1, topk=2, d_key=4, d_out=1)
    with pytest.raises(PEERInputError, match="experts.up has 1 columns"):
        parallelize_module(PEER(narrow), mesh, ExpertColumnParallel())


def _two_devices(rank, world, path):
    for cfg in (CFG, GLU):
        _equal_to_one_device(rank, world, cfg)
    _shard_output_and_checkpoint(rank, world, path)
    _meta_fully_shard(rank, world)
    _data_parallel_sparse(rank, world)


def _meta_fully_shard(rank, world):
    # FSDP2's deferred-initialisation recipe: build on meta, shard, to_empty, reset_parameters.
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    with torch.device("meta"):
        model = PEER(CFG, seed=7, dtype="float64")
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    model.reset_parameters()
    reference = PEER(CFG, seed=7, dtype="float64")
    for name, p in model.named_parameters():
        assert torch.equal(p.full_tensor(), reference.get_parameter(name)), name
    for name, b in model.named_buffers():
        assert torch.equal(b, reference.get_buffer(name)), name
    x, mask, dy = _inputs(CFG, seed=30 + rank)
    y = model.train()(x, mask=mask)
    torch.testing.assert_close(y, reference.train()(x, mask=mask), **TOL)
    for name, value in model.named_buffers():
        torch.testing.assert_close(value, reference.get_buffer(name), **TOL, msg=name)


def test_two_devices_equal_one_device_sharded_output_checkpoints_and_data_parallel_sparse(tmp_path):
    _spawn(_two_devices, 2, str(tmp_path / "peer.safetensors"))


def _with_fully_shard(rank, world):
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    with pytest.raises(PEERInputError, match="device_mesh has 2 dimensions, but expected a 1-D mesh"):
        ExpertColumnParallel()._apply(PEER(CFG), mesh)
    reference = PEER(CFG, seed=7, dtype="float64").train()
    model = parallelize_module(copy.deepcopy(reference), mesh["tp"], ExpertColumnParallel())
    fully_shard(model, mesh=mesh["dp"])
    down = model.experts.down
    assert down.placements == (Shard(0), Shard(1)), down.placements  # rows over dp, columns over tp
    dp, tp = mesh["dp"].get_local_rank(), mesh["tp"].get_local_rank()
    assert down.to_local().shape == (_chunk(CFG.n_experts, 2, dp), _chunk(CFG.d_model, 2, tp))
    # Each data-parallel rank takes its own batch; the tensor-parallel pair shares it.
    x, mask, dy = _inputs(CFG, seed=20 + dp)
    y = model(x, mask=mask)
    (y * dy).sum().backward()
    # FSDP averages the data-parallel ranks' gradients; each rank's reference is one device.
    expected = {}
    for batch in range(2):
        one = copy.deepcopy(reference)
        xb, mb, dyb = _inputs(CFG, seed=20 + batch)
        y_ref = one(xb, mask=mb)
        if batch == dp:
            torch.testing.assert_close(y, y_ref, **TOL)
            for name, value in model.named_buffers():
                torch.testing.assert_close(value, one.get_buffer(name), **TOL, msg=name)
        (y_ref * dyb).sum().backward()
        for name, p in one.named_parameters():
            expected[name] = expected.get(name, 0) + p.grad / 2
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.full_tensor(), expected[name], **TOL, msg=name)


def _four_devices(rank, world):
    for cfg in (UNEVEN, UNEVEN_GLU):
        _equal_to_one_device(rank, world, cfg)
    _with_fully_shard(rank, world)


def test_four_devices_uneven_columns_and_fully_shard_on_a_2x2_mesh():
    _spawn(_four_devices, 4)


def test_unsharded_params_are_refused():
    from peer_backends.torch.parallel import local_inputs

    module = PEER(CFG)
    params, state = module.params_and_state()
    with pytest.raises(PEERInputError, match=r"params\['query.kernel'\] is a Parameter, but expected a DTensor"):
        local_inputs(CFG, params, torch.zeros(2, CFG.d_model), None, None)
    # The "sharded" expert stage is chosen by where the tables live: plain tensors cannot run it.
    with pytest.raises(
        PEERConfigError,
        match=r"implementation='sharded' is not available here: the expert "
        r"tables are not DTensors",
    ):
        peer_backends.get("torch").apply(CFG, params, state, torch.zeros(2, CFG.d_model), implementation="sharded")


def test_output_layout_is_checked():
    with pytest.raises(PEERInputError, match=r"output_layouts=Shard\(dim=0\)"):
        ExpertColumnParallel(output_layouts=Shard(0))


def _data_parallel_sparse(rank, world):
    # DDP averages the row-sparse table gradients (SPEC §7.1) over the ranks as the dense ones.
    from torch.nn.parallel import DistributedDataParallel

    cfg = GLU
    model = DistributedDataParallel(PEER(cfg, seed=5, dtype="float64", sparse=True).train())
    x, mask, dy = _inputs(cfg, seed=40 + rank)
    (model(x, mask=mask) * dy).sum().backward()
    expected = {}
    for other in range(world):  # the dense gradients of every rank's batch, averaged
        dense = PEER(cfg, seed=5, dtype="float64").train()
        x, mask, dy = _inputs(cfg, seed=40 + other)
        (dense(x, mask=mask) * dy).sum().backward()
        for name, p in dense.named_parameters():
            expected[name] = expected.get(name, 0) + p.grad / world
    for name, p in model.module.named_parameters():
        assert p.grad.is_sparse == name.startswith("experts."), name
        torch.testing.assert_close(p.grad.to_dense(), expected[name], **TOL, msg=name)
    # Sharded tables take no sparse gradients: a clear error, not a wrong result.
    mesh = init_device_mesh("cpu", (world,))
    sharded = parallelize_module(PEER(cfg, seed=5, dtype="float64", sparse=True), mesh, ExpertColumnParallel())
    with pytest.raises(PEERConfigError, match="sparse=True with expert tables sharded as DTensors"):
        sharded(x)
    with torch.no_grad():  # no gradient: the dense path, which runs sharded
        sharded(x)
