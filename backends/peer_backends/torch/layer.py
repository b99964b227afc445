import sys
import warnings

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

import peer_ref
from peer_ref import checks
from peer_ref.errors import PEERInputError

from .._implementation import check_known
from .._layer import check_seed, reference_tables
from .core import dtype_name, meta, native_dtype, transformed, unwrapped
from .peer import (
    IMPLEMENTATIONS,
    check_sparse,
    choose_implementation,
    compute_dtype_name,
    forward,
    routing_aux,
    validate,
)


class Tables(nn.Module):
    """The tensors of one canonical-name prefix (``query``, ``query_norm``, ``keys``, ``experts``);
    its repr lists their shapes and dtypes."""

    def extra_repr(self):
        tensors = [*self._parameters.items(), *self._buffers.items()]
        return ", ".join(f"{name}: {tuple(value.shape)} {dtype_name(value)}" for name, value in tensors)


class SparseTables(Tables, nn.EmbeddingBag):
    """The ``experts`` tables of a layer built with ``sparse=True``: row-sparse gradients, as an
    ``nn.EmbeddingBag(sparse=True)``'s weight has. It is an EmbeddingBag for one reason: torch's
    DistributedDataParallel reduces a parameter's gradient as sparse only where its module is an
    ``nn.Embedding`` or ``nn.EmbeddingBag`` with ``sparse=True``. It holds no ``weight`` and is
    never called; the layer reads its tables by their canonical names."""

    def __init__(self):
        nn.Module.__init__(self)
        self.sparse = True

    def reset_parameters(self):
        """Nothing: the layer (``PEER.reset_parameters``) draws every table (SPEC §8)."""

    def forward(self, *args, **kwargs):
        raise TypeError("the expert tables are read by the PEER layer, not called")


def _recomputing():
    """Whether this forward runs inside a backward pass: activation checkpointing's recomputation
    (torch.utils.checkpoint, reentrant or not), which must not update the running statistics a
    second time (SPEC §3.3)."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def _laid_out_like(param, value):
    """``value``, a whole table, laid out like ``param``: sharded the same way where ``param`` is
    a DTensor (FSDP2's ``fully_shard``, tensor parallelism), on param's device otherwise."""
    module = sys.modules.get("torch.distributed.tensor")  # no DTensor exists before it is imported
    if module is not None and isinstance(param, module.DTensor):
        return module.distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    return value.to(param.device)


def _flag_coalesced(param):
    """A post-accumulate-grad hook of the expert tables: AccumulateGrad stores a sparse gradient
    flagged uncoalesced, whatever it was (torch rebuilds it), and ``coalesce()`` (which
    SparseAdam and Adagrad call) would then sort it again, O(U log U * d). A gradient whose rows
    strictly increase, as one backward leaves it, is coalesced: flag it so. A sum of several
    backward calls' gradients repeats rows and stays uncoalesced."""
    grad = param.grad
    if grad is None or grad.layout != torch.sparse_coo or grad.is_coalesced() or grad.sparse_dim() != 1:
        return
    rows = grad._indices()[0]
    if bool((rows[1:] > rows[:-1]).all()):
        param.grad = torch.sparse_coo_tensor(
            grad._indices(), grad._values(), grad.shape, is_coalesced=True, check_invariants=False
        )


# The tables that carry _flag_coalesced (a copy of a layer, deepcopy or pickle, has new tensors
# without the hook; the layer's forward hooks them again).
_FLAGGED = WeakIdKeyDictionary()


def _hook_tables(module):
    """Register _flag_coalesced on each expert table of ``module`` that lacks it."""
    for key in peer_ref.EXPERT_TABLES:
        if key in module.cfg.param_shapes():
            param = module.get_parameter(key)
            if param not in _FLAGGED:
                param.register_post_accumulate_grad_hook(_flag_coalesced)
                _FLAGGED[param] = True


def _wrapped(tensor):
    return torch._C._functorch.is_functorch_wrapped_tensor(tensor)


class PEER(nn.Module):
    """PEER as an nn.Module whose state_dict keys are the canonical names.

    Args:
      cfg: the PEERConfig.
      seed: None (default) draws the initial parameters from torch's default generator for
        ``device``, as ``nn.Linear`` does, so ``torch.manual_seed`` makes a model reproducible
        and two layers differ; an int gives the reference's tables ``peer_ref.init(cfg, seed)``
        rounded to ``dtype``, the same values in every framework (SPEC §8).
      dtype: the parameters' dtype, a name or a torch dtype: float32 (default), float64,
        bfloat16 or float16; batch-norm statistics are float32 for the 16-bit ones (SPEC §10).
      device: where the tensors live (``"meta"`` allocates and computes nothing, with a seed
        too; ``to_empty(device=...)`` then ``reset_parameters()`` draws them, as for torch's
        own modules, DTensor parameters of FSDP2's ``fully_shard`` included).
      implementation: the kernels of the expert stage (below).
      sparse: False (default), or True for row-sparse gradients of the expert tables (below).

    Parameters live in submodules named after the first part of each canonical name
    (``query``, ``query_norm``, ``keys``, ``experts``), so ``keys.left`` or
    ``query_norm.mean`` come out of ``state_dict()`` and go into ``load_state_dict()`` as is.
    ``forward`` returns y, and ``(y, aux)`` with ``return_aux=True``. In training mode the
    batch-norm buffers are updated in place, once per training step (SPEC §3.3): under
    activation checkpointing (``torch.utils.checkpoint``, reentrant or not) the recomputation
    in the backward pass leaves them alone. ``torch.export`` programs of either mode save,
    load and run like the module, the training program updating its buffers.

    torch.func: ``grad``, ``vjp``, ``jvp``, ``jacrev``, ``jacfwd`` and ``vmap`` (per-sample
    gradients: ``vmap(grad(...))``) run through ``torch.func.functional_call(module, ...)`` on
    the "aten" and "triton" implementations: under a transform the routing and the expert
    stage run the same math in plain differentiable operations (experts.gathered_stage),
    since the peer:: operators' generated autograd functions cannot be transformed. A
    training call under ``vmap`` with batch norm raises PEERInputError (each sample would have
    statistics of its own; take per-sample gradients in eval mode); under the other
    transforms it updates the buffers once (see ``_update_buffers``). ``torch.compile`` of a
    torch.func transform of the layer is not supported (compile the layer, or transform it
    eagerly).

    Casting (``.to(dtype)``, ``.half()``, ``.bfloat16()``, ``.double()``) casts parameters and
    batch-norm buffers together, as ``nn.BatchNorm1d`` does with its running statistics: they
    live in the module's dtype and ``state_dict()`` holds them so. The functional API keeps the
    statistics of 16-bit parameters in float32 (SPEC §10), so a call reads the buffers upcast
    to float32, computes the statistics as SPEC §3.3 prescribes, and stores the update rounded
    once to the buffers' dtype. (BatchNorm1d's bfloat16 CPU kernel also rounds intermediate
    products, so its stored values can differ from these by one unit in the last place.) A
    module built with ``dtype="bfloat16"`` keeps float32 buffers and rounds nothing.

    Under ``torch.autocast(device_type, dtype=d)`` (d bfloat16 or float16) a float32 module
    casts x to d and runs the functional API's mixed mode (``compute_dtype=d``, SPEC §10.3):
    expert rows and x read in d, batch-norm statistics, routing and accumulation in float32,
    y and dx in d, parameter gradients float32; the same in training and eval, on the fused
    batch-norm path and under ``torch.compile``. The gradients are the functional API's when
    backward runs outside the autocast region (torch's advice); inside it, and in compiled
    graphs, torch autocasts the backward's matmuls as well. Outside autocast an x whose dtype differs
    from the parameters' raises PEERInputError (``nn.Linear`` refuses it too).

    ``implementation`` names the kernels of the expert stage (``peer_backends.torch.peer.
    IMPLEMENTATIONS``): None (default) picks, at each call, the best available for x's device
    ("triton" on CUDA devices where triton is installed, else "aten"); a name forces it, and a
    call on a device where it cannot run raises PEERConfigError. An unknown name raises
    PEERConfigError at construction. Sharded expert tables (``ExpertColumnParallel``) run "sharded".

    ``sparse=True`` makes the gradients of the expert tables (``peer_ref.EXPERT_TABLES``:
    ``experts.down``, ``experts.up``, ``experts.gate``, ``experts.bias``) row-sparse, as
    ``nn.Embedding(sparse=True)`` does (SPEC §7.1): after ``backward()`` their ``.grad`` is a
    sparse COO tensor of the table's shape and dtype (float32 under autocast), listing the rows
    (experts) that valid tokens (or the routing override) selected, sorted and unique, and
    coalesced (``is_coalesced()``). A second backward before ``zero_grad`` adds its sparse
    gradient to it (torch's sparse addition): the sum is flagged coalesced where its rows are
    still sorted and unique, and ``.grad.coalesce()`` gives the dense sum's row-sparse form
    either way (see ``_flag_coalesced``). The
    routing parameters' gradients stay dense. The expert stage and its table gradients then cost
    O(tokens * heads * topk * d_model), independent of N: the call gathers the selected rows
    into small tables and runs the expert stage on those. Optimize the tables (``sparse_parameters()``) with an optimizer
    that takes sparse gradients (``torch.optim.SparseAdam``, ``SGD``, ``Adagrad``) and the rest
    (``dense_parameters()``) with any other. DistributedDataParallel reduces the sparse
    gradients as it does an ``nn.EmbeddingBag(sparse=True)``'s (the ``experts`` submodule is one:
    ``SparseTables``).
    ``torch.nn.utils.clip_grad_norm_`` raises NotImplementedError on any sparse gradient
    (``nn.Embedding(sparse=True)``'s too): clip with ``torch.nn.utils.get_total_norm`` of the
    gradients, a sparse one as ``grad.coalesce().values()``, then
    ``torch.nn.utils.clip_grads_with_norm_``, which scales sparse gradients. Calls without
    gradients (``torch.no_grad``) run the dense path. ``torch.compile`` of the layer runs it, with graph breaks around the row selection (whose
    size depends on the data; it runs eagerly); under torch.func transforms and on sharded
    tables (``ExpertColumnParallel``) a call that would compute sparse gradients raises
    PEERConfigError.

    Raises:
      PEERConfigError: a seed that is not None or an int >= 0; an unknown implementation.
      PEERInputError: an unsupported dtype; a ``sparse`` that is not a bool.
    """

    def __init__(self, cfg, seed=None, dtype=None, device=None, implementation=None, sparse=False):
        super().__init__()
        check_known("torch", implementation, IMPLEMENTATIONS)  # whether it runs depends on each call's device
        self.cfg = cfg
        self.seed = check_seed(seed)
        self.implementation = implementation
        self.sparse = checks.check_flag("sparse", sparse)
        name = checks.check_dtype_name(compute_dtype_name(dtype) or "float32")
        for group in ("query", "query_norm", "keys", "experts"):
            self.add_module(group, SparseTables() if group == "experts" and self.sparse else Tables())
        for key, shape in cfg.param_shapes().items():
            value = torch.empty(shape, dtype=native_dtype(name), device=device)
            self._owner(key).register_parameter(key.split(".")[1], nn.Parameter(value))
        if self.sparse:
            _hook_tables(self)
        s_dtype = native_dtype(checks.state_dtype(name))
        for key, shape in cfg.state_shapes().items():
            self._owner(key).register_buffer(key.split(".")[1], torch.empty(shape, dtype=s_dtype, device=device))
        self._last_aux = None
        self.reset_parameters()

    def reset_parameters(self):
        """Draw the parameters afresh and reset the batch-norm statistics (SPEC §8).

        With ``seed=None``: normal draws from torch's default generator for the parameters'
        device, in float32 (float64 for float64 parameters) rounded once to their dtype. With a
        seed: the reference's tables ``peer_ref.init(cfg, seed)``. On the meta device (deferred
        initialisation: ``PEER(cfg, device="meta")`` or ``with torch.device("meta")``) nothing
        is drawn nor computed, on the host or anywhere: the tensors hold no values until
        ``to_empty(device=...)`` and a call of this method there, which draws the same tables
        as a direct build with the same seed (FSDP2's ``fully_shard`` recipe).
        """
        if self.experts.down.is_meta:
            return
        stds, constants = peer_ref.init_std(self.cfg), peer_ref.init_constant(self.cfg)
        dtype = dtype_name(self.experts.down)
        reference = None if self.seed is None else reference_tables(self.cfg, self.seed, dtype)[0]
        draw = torch.float64 if dtype == "float64" else torch.float32
        with torch.no_grad():
            for key, param in self.named_parameters():
                if key not in stds:
                    param.fill_(constants[key])
                    continue
                if reference is not None:
                    value = torch.from_numpy(reference[key])
                else:
                    value = torch.randn(param.shape, dtype=draw, device=param.device) * stds[key]
                param.copy_(_laid_out_like(param, value))
            for key, buffer in self.named_buffers():
                buffer.fill_(constants[key])

    def _owner(self, name):
        return self._modules[name.split(".")[0]]

    def params_and_state(self):
        """The functional ``(params, state)`` dicts.

        Parameters are the module's own tensors. The state is the module's own buffers when
        their dtype is the functional one (``peer_ref.checks.state_dtype`` of the parameters'),
        else float32 copies (a module cast to bfloat16/float16 after construction).
        """
        params = dict(self.named_parameters())
        want = native_dtype(checks.state_dtype(dtype_name(self.experts.down)))
        return params, {name: value.to(want) for name, value in self.named_buffers()}

    def sparse_parameters(self):
        """The expert tables (``peer_ref.EXPERT_TABLES`` the config has), whose gradients are
        row-sparse with ``sparse=True``: the parameters for ``torch.optim.SparseAdam``.
        An iterator, as ``parameters()``."""
        return (param for name, param in self.named_parameters() if name in peer_ref.EXPERT_TABLES)

    def dense_parameters(self):
        """Every other parameter (the routing's: query, keys, batch-norm scale and offset), whose
        gradients are always dense. An iterator, as ``parameters()``."""
        return (param for name, param in self.named_parameters() if name not in peer_ref.EXPERT_TABLES)

    def load_params_and_state(self, params, state):
        """Load functional dicts (canonical names) after checking names, shapes and dtypes."""
        dtype = checks.check_trees(self.cfg, params, state, meta)
        own = dtype_name(self.experts.down)
        if dtype != own:
            raise PEERInputError(f"params dtype={dtype}, but expected {own} (the module's; nothing is cast)")
        self.load_state_dict({**params, **state}, strict=True)

    def forward(self, x, mask=None, routing=None, *, return_aux=False):
        """y = PEER(x), and in training mode (``module.train()``) the batch-norm statistics updated.

        Args:
          x: (..., d_model) floating tensor of the parameters' dtype (under ``torch.autocast``
            any floating dtype but float64, cast as autocast casts a matmul input; see the
            class doc).
          mask: optional bool tensor of shape ``x.shape[:-1]``; **True keeps a token**, False
            drops it (its output is zero and it is left out of the batch-norm statistics,
            SPEC §5). This is the opposite of ``nn.MultiheadAttention``'s
            ``key_padding_mask``, where True marks padding: pass ``~key_padding_mask``.
          routing: optional int tensor (..., heads, topk) of expert indices to use instead of
            the product-key search (SPEC §4).
          return_aux: also return the routing of this call, as ``nn.MultiheadAttention``
            returns its attention weights with ``need_weights=True``.

        Returns:
          y, (..., d_out) in x's dtype (the autocast dtype under autocast); with
          ``return_aux=True``, ``(y, aux)`` where aux holds "indices" (int64), "scores" and
          "weights" (float), each (..., heads, topk) and detached.

        Raises:
          PEERInputError: x, mask or routing of the wrong shape or dtype (SPEC §9).
          PEERConfigError: an implementation that cannot run on x's device; sparse=True where
            a gradient is computed under a torch.func transform or on sharded tables.
        """
        params, state = self.params_and_state()
        device_type = x.device.type if isinstance(x, torch.Tensor) else "cpu"
        param_dtype = params["experts.down"].dtype
        x, low = self._autocast(device_type, x, param_dtype)
        if low is None and isinstance(x, torch.Tensor) and x.dtype != param_dtype:
            raise PEERInputError(
                f"x.dtype={dtype_name(x)}, but expected {compute_dtype_name(param_dtype)} (the layer's parameters' "
                "dtype; nothing is cast implicitly): cast x, cast the layer with .to(dtype), or for mixed "
                "precision run a float32 layer under torch.autocast(device_type, dtype=torch.bfloat16)"
            )
        implementation = choose_implementation(
            self.implementation, x.device if isinstance(x, torch.Tensor) else "cpu", params
        )
        # Row-sparse gradients where a gradient of the tables will be computed (SPEC §7.1).
        sparse = self.sparse and torch.is_grad_enabled() and params["experts.down"].requires_grad
        if sparse:
            check_sparse(True, implementation)
            if not torch.compiler.is_compiling():
                _hook_tables(self)
        # PEER prescribes its own precision per step; autocast must not re-cast its matmuls and batch norm.
        with torch.autocast(device_type, enabled=False):
            lead = validate(self.cfg, params, state, x, self.training, mask, routing, compute_dtype=low).lead
            y, new_state, indices, scores, weights = forward(
                self.cfg,
                self.training,
                params,
                state,
                x,
                mask,
                routing,
                low=low,
                implementation=implementation,
                sparse=sparse,
            )
        if self.training and new_state and not _recomputing():
            self._update_buffers(new_state)
        aux = routing_aux(self.cfg, lead, indices, scores, weights)
        self._last_aux = aux
        y = y.reshape(lead + (self.cfg.d_out,))
        return (y, aux) if return_aux else y

    def _update_buffers(self, new_state):
        """Copy the new batch-norm statistics into the buffers (rounding to their dtype, see the
        class doc). Under torch.func's grad, vjp, jvp, jacrev and jacfwd the module's own buffers
        get the plain values of this call's statistics (torch.func refuses to mutate a tensor
        captured from outside the transform, so the copy runs outside it); buffers passed in
        through ``torch.func.functional_call`` are updated inside it. Under vmap each sample
        has statistics of its own, which the module's one set of buffers cannot hold, so a
        training call there is refused (PEERInputError)."""
        # copy_ of a detached value outside no_grad: a buffer mutation that torch.export
        # represents (a no_grad region would become a submodule its loader rejects).
        for name, value in new_state.items():
            buffer = self.get_buffer(name)
            if not transformed() or _wrapped(buffer):
                buffer.copy_(value.detach())  # rounds to the buffer's dtype (see class doc)
                continue
            plain = unwrapped(value)
            if plain is None:
                raise PEERInputError(
                    "a training-mode call under torch.func.vmap cannot update the batch-norm buffer "
                    f"{name!r}: each vmapped sample has batch statistics of its own, but the module holds "
                    "one set. Call the layer in eval mode (module.eval()) under vmap, e.g. for per-sample "
                    "gradients, and update the statistics with a training call outside vmap"
                )
            from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack

            with temporarily_clear_interpreter_stack(), torch.no_grad():
                buffer.copy_(plain)

    @property
    def last_aux(self):
        """Deprecated: the routing of the last call; call the layer with ``return_aux=True``."""
        warnings.warn(
            "PEER.last_aux is deprecated: call the layer with return_aux=True, which returns (y, aux)",
            FutureWarning,
            stacklevel=2,
        )
        return self._last_aux

    @staticmethod
    def _autocast(device_type, x, param_dtype):
        """(x, low): x as autocast casts a matmul input, and the mixed mode's low dtype or None.

        Inside ``torch.autocast(device_type, dtype=d)`` float32 parameters with d bfloat16 or
        float16 run the functional API's mixed mode (``compute_dtype=d``, SPEC §10.3); parameters
        already in d run as they are. Like autocast, floating x other than float64 is cast to d.
        Outside autocast nothing is cast.
        """
        if not isinstance(x, torch.Tensor) or not torch.is_autocast_enabled(device_type):
            return x, None
        amp = torch.get_autocast_dtype(device_type)
        if param_dtype not in (torch.float32, amp):
            return x, None
        if x.is_floating_point() and x.dtype != torch.float64:
            x = x.to(amp)
        return x, (amp if param_dtype == torch.float32 and amp != torch.float32 else None)

    def extra_repr(self):
        return f"{self.cfg!r}, seed={self.seed!r}, implementation={self.implementation!r}, sparse={self.sparse!r}"
