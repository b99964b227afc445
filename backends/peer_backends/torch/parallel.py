"""Expert tables sharded by columns over a DeviceMesh dimension, as DTensors.

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    from peer_backends.torch.parallel import ExpertColumnParallel

    mesh = init_device_mesh("cuda", (8,), mesh_dim_names=("tp",))
    layer = parallelize_module(PEER(cfg), mesh, ExpertColumnParallel())

The layout (docs/guide/sharding.md): every device holds all N rows of ``experts.down``
(N, d_model), ``experts.gate`` (N, d_model; GLU experts, SPEC §3.10) and ``experts.up`` (N, d_out)
for its slice of the columns (``Shard(1)``); every other parameter, ``experts.bias`` included, is
replicated. The routing (query, batch norm, product-key top-k) runs replicated on every device.
Each device dots its slice of x with its slice of the selected down rows (and gate rows); the
partial dots, T * heads * topk scalars per table, stacked, are summed over the mesh in one
all-reduce (the DTensor ``Partial -> Replicate`` redistribution), so every device holds the
whole pre-activation (and gate value). The up projection then yields the output's own slice
of features (``Shard(-1)``), all-gathered into a replicated output unless
``output_layouts=Shard(-1)`` is asked for (for a following row-parallel layer). No step moves
a table row: traffic is O(T * (heads * topk + d_model)) per call whatever N is (2 * heads *
topk dots with GLU experts), and skewed expert usage loads every device alike.

Backward, the DTensor redistributions' adjoints give: the coefficient gradient all-reduced
(each device holds the part from its features), the x gradient of the expert part all-gathered
from its column slices, the table gradients local (``Shard(1)``), the replicated parameters'
gradients replicated.

Where the tables live chooses the expert stage: for DTensor tables ``peer.choose_implementation``
picks implementation "sharded", whose stage (``expert_stage``) and input, output and cotangent
hooks (``local_inputs``, ``sharded_output``, ``sharded_cotangent``) are this module's; the
layer's forward and the functional ``apply``/``vjp`` are the one-device ones, unchanged, and so
is the mixed mode (SPEC §10.3: each device reads its table columns rounded to the low dtype;
``torch.autocast`` for the layer, ``compute_dtype=`` for the functional API).

Checkpoints: ``gather_params_and_state`` (a collective) returns whole tensors for
``peer_backends.save``; ``load_params_and_state`` shards whole tensors (e.g. from
``peer_backends.load``) into a parallelized layer. ``torch.distributed.checkpoint`` saves and
loads the DTensor ``state_dict()`` as is, each rank writing its own shards.
"""

from __future__ import annotations

import functools

import torch
from torch.distributed.tensor import DeviceMesh, DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from peer_ref import checks
from peer_ref.errors import PEERConfigError, PEERInputError

from ..sharding import OUTPUT_TABLES, column_tables, dot_tables
from .core import dtype_name, meta
from .experts import activation, down_projection, expert_bias, expert_groups, round_tables, up_projection

__all__ = [
    "OUTPUT_TABLES",
    "ExpertColumnParallel",
    "column_tables",
    "dot_tables",
    "expert_stage",
    "gather_params_and_state",
    "load_params_and_state",
    "local_inputs",
    "sharded_cotangent",
    "sharded_output",
]


class ExpertColumnParallel(ParallelStyle):
    """Shard a PEER layer's expert tables by columns over a 1-D DeviceMesh (see the module doc).

    For ``torch.distributed.tensor.parallel.parallelize_module`` on a ``peer_backends.torch``
    ``PEER`` module. ``experts.down``, ``experts.gate`` (GLU experts) and ``experts.up`` become
    DTensors ``Shard(1)``; every other parameter a replicated DTensor; the batch-norm buffers
    stay plain tensors, updated alike on every rank. The input x must be replicated over the mesh: a plain tensor equal on
    every rank, or a DTensor (redistributed to ``Replicate()`` first).

    Args:
      output_layouts: ``Replicate()`` (default) or ``Shard(-1)``: the layout of y over the mesh.
      use_local_output: return y as the local ``torch.Tensor`` (default, as ColwiseParallel
        does) rather than a DTensor.

    Raises:
      PEERInputError: the module is not a PEER layer, the mesh is not 1-D, a table has fewer
        columns than the mesh has devices, or output_layouts is neither layout.
    """

    def __init__(self, *, output_layouts=None, use_local_output: bool = True):
        super().__init__()
        layout = Replicate() if output_layouts is None else output_layouts
        if not (isinstance(layout, Replicate) or (isinstance(layout, Shard) and layout.dim in (-1, 1))):
            raise PEERInputError(f"output_layouts={output_layouts!r}, but expected Replicate() or Shard(-1)")
        self.output_layouts = (Shard(-1) if isinstance(layout, Shard) else Replicate(),)
        self.use_local_output = use_local_output

    def _apply(self, module, device_mesh: DeviceMesh):
        from .layer import PEER

        if not isinstance(module, PEER):
            raise PEERInputError(f"module is {type(module).__name__}, but expected a peer_backends.torch PEER layer")
        cfg = module.cfg
        if module.implementation not in (None, "sharded"):
            raise PEERConfigError(
                f"implementation={module.implementation!r}, but sharded expert tables run 'sharded' "
                "(build the layer with implementation=None or 'sharded')"
            )
        if device_mesh.ndim != 1:
            raise PEERInputError(
                f"device_mesh has {device_mesh.ndim} dimensions, but expected a 1-D mesh (e.g. mesh['tp'])"
            )
        size = device_mesh.size()
        for name in column_tables(cfg):
            width = cfg.param_shapes()[name][1]
            if width < size:
                raise PEERInputError(
                    f"{name} has {width} columns, but expected at least one per device of the {size}-device mesh"
                )
        for name, param in list(module.named_parameters()):
            placement = Shard(1) if name in column_tables(cfg) else Replicate()
            owner, leaf = name.split(".")
            value = distribute_tensor(param.data, device_mesh, [placement], src_data_rank=self.src_data_rank)
            module.get_submodule(owner).register_parameter(
                leaf, torch.nn.Parameter(value, requires_grad=param.requires_grad)
            )
        # The layer's forward is unchanged: its expert stage is "sharded" because its tables are DTensors
        # (peer.choose_implementation); only y's layout over the mesh is set here, on the way out.
        module.register_forward_hook(functools.partial(_prepare_output, self.output_layouts, self.use_local_output))
        return module


def _prepare_output(layouts, use_local_output, module, inputs, y):
    layouts = tuple(Shard(y.ndim - 1) if p.is_shard() else p for p in layouts)
    if tuple(y.placements) != layouts:
        y = y.redistribute(placements=layouts)
    return y.to_local() if use_local_output else y


def _local(value, mesh):
    """A tensor's replicated local value: a DTensor is redistributed to Replicate first."""
    if isinstance(value, DTensor):
        if any(not p.is_replicate() for p in value.placements):
            value = value.redistribute(mesh, [Replicate()] * mesh.ndim)
        return value.to_local()
    return value


def local_inputs(cfg, params, x, mask, routing):
    """The input hook of the "sharded" expert stage (``peer.ExpertStage``): the replicated
    parameters and x, mask and routing as local tensors (x a plain tensor equal on every rank, or
    a DTensor, redistributed to Replicate), the column tables kept as DTensors ``Shard(1)``.

    Raises PEERInputError for a parameter that is not a DTensor in this layout.
    """
    local = {}
    for name, value in params.items():
        if not isinstance(value, DTensor):
            raise PEERInputError(
                f"params[{name!r}] is a {type(value).__name__}, but expected a DTensor (apply ExpertColumnParallel)"
            )
        sharded = name in column_tables(cfg)
        expected = (Shard(1),) if sharded else (Replicate(),)
        if tuple(value.placements) != expected:
            raise PEERInputError(f"params[{name!r}] has placements {value.placements}, but expected {expected}")
        local[name] = value if sharded else value.to_local()
    mesh = params["experts.down"].device_mesh
    return local, _local(x, mesh), _local(mask, mesh), _local(routing, mesh)


def expert_stage(cfg, p, xf, flat, weights, low=None):
    """The expert stage (SPEC §3.9-§3.11) on this rank's columns of the tables (implementation
    "sharded"): p holds the column tables as DTensors ``Shard(1)`` and the rest as local tensors,
    in the compute dtype; xf (T, d_model), flat and weights (T, heads*topk) are replicated; ``low``
    the mixed mode's torch dtype or None (SPEC §10.3: the tables' rows are read rounded to it).
    Returns this rank's columns of y, (T, d_out / P).
    """
    mesh = p["experts.down"].device_mesh
    tables = {name: p[name].to_local() for name in column_tables(cfg)}
    if low is not None:  # rounding is elementwise: a column slice rounds as its whole table does
        tables = round_tables(tables, low)
    groups = expert_groups(flat, cfg.n_experts)
    replicate, shard = [Replicate()], [Shard(1)]
    x_cols = DTensor.from_local(xf, mesh, replicate, run_check=False).redistribute(mesh, shard).to_local()
    # One all-reduce for every dot table: (1 or 2, T, heads * topk) partial dots, stacked.
    partial = torch.stack([down_projection(x_cols, tables[name], flat, groups) for name in dot_tables(cfg)])
    dots = DTensor.from_local(partial, mesh, [Partial()], run_check=False).redistribute(mesh, replicate).to_local()
    pre = dots[0]
    if cfg.expert_bias:
        pre = pre + expert_bias(p["experts.bias"], flat, groups)
    hidden = activation(cfg.activation, pre)
    if cfg.expert_glu:  # SPEC §3.10: times the linear gate x . experts.gate[i]
        hidden = hidden * dots[1]
    coef = weights * hidden
    # Each rank's output columns see all of coef: its gradient is the sum over the mesh.
    coef = DTensor.from_local(coef, mesh, replicate, run_check=False).to_local(grad_placements=[Partial()])
    return up_projection(coef, tables["experts.up"], flat, groups)


def sharded_output(params, y):
    """The output hook of the "sharded" expert stage: this rank's columns of y (T, d_out / P) as
    the DTensor (T, d_out) ``Shard(1)`` over the tables' mesh."""
    up = params["experts.up"]
    shape = torch.Size((y.shape[0], up.shape[1]))
    return DTensor.from_local(y, up.device_mesh, [Shard(1)], run_check=False, shape=shape, stride=(shape[1], 1))


def sharded_cotangent(y, dy):
    """The cotangent hook of the "sharded" expert stage: a whole dy (equal on every rank) as the
    DTensor of y's layout, each rank keeping its columns (nothing is communicated)."""
    return distribute_tensor(dy, y.device_mesh, y.placements, src_data_rank=None)


def gather_params_and_state(module) -> tuple[dict, dict]:
    """Whole (unsharded) ``(params, state)`` of a parallelized layer, on every rank.

    A collective: every rank of the mesh calls it. The result feeds ``peer_backends.save``
    (typically on rank 0 only).
    """
    params, state = module.params_and_state()
    whole = {
        name: (value.full_tensor() if isinstance(value, DTensor) else value).detach() for name, value in params.items()
    }
    return whole, {name: value.detach().clone() for name, value in state.items()}


@torch.no_grad()
def load_params_and_state(module, params: dict, state: dict) -> None:
    """Load whole canonical ``(params, state)`` into a parallelized layer, each rank keeping its shard.

    Every rank passes the same whole tensors (e.g. from ``peer_backends.load``); nothing is
    communicated. Checked like a call (SPEC §9): names, shapes, one dtype, the module's dtype.
    """
    dtype = checks.check_trees(module.cfg, params, state, meta)
    own_params, own_state = module.params_and_state()
    own = dtype_name(own_params["experts.down"])
    if dtype != own:
        raise PEERInputError(f"params dtype={dtype}, but expected {own} (the module's; nothing is cast)")
    for name, target in own_params.items():
        value = params[name].to(target.device)
        if isinstance(target, DTensor):
            value = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)
            target.to_local().copy_(value.to_local())
        else:
            target.copy_(value)
    for name, target in own_state.items():
        target.copy_(state[name].to(target.device))


def _demo() -> None:
    """``torchrun --nproc-per-node P -m peer_backends.torch.parallel``: one training step of a
    sharded layer, checked against the same layer on one device (docs/guide/sharding.md)."""
    import copy
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from peer_ref.config import PEERConfig

    from .layer import PEER

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if on_gpu else "gloo")
    try:
        device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("tp",))
        cfg = PEERConfig(d_model=256, n_experts=128**2, heads=8, topk=16, d_key=64)
        reference = PEER(cfg, seed=0, device=device).train()
        layer = parallelize_module(copy.deepcopy(reference), mesh, ExpertColumnParallel())
        x = torch.randn(512, cfg.d_model, generator=torch.Generator().manual_seed(1)).to(device)
        y, y_ref = layer(x), reference(x)
        y.square().sum().backward()
        y_ref.square().sum().backward()
        grad_diff = max(
            (p.grad.full_tensor() - q.grad).abs().max().item()
            for p, q in zip(layer.parameters(), reference.parameters())
        )
        local = layer.experts.down.to_local()
        if dist.get_rank() == 0:
            print(
                f"{mesh.size()} devices ({device.type}): experts.down {tuple(layer.experts.down.shape)} held as "
                f"{tuple(local.shape)} per device; max |y - y_1device| = {(y - y_ref).abs().max().item():.2e}, "
                f"max gradient difference {grad_diff:.2e}"
            )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _demo()
