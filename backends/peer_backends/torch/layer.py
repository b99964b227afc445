import torch
from torch import nn

from peer_ref import checks
from peer_ref.errors import PEERInputError

from .._implementation import check_known
from .core import dtype_name, meta, native_dtype
from .peer import IMPLEMENTATIONS, choose_implementation, forward, init, routing_aux, validate


class PEER(nn.Module):
    """PEER as an nn.Module whose state_dict keys are the canonical names.

    Parameters live in plain submodules named after the first part of each canonical name
    (``query``, ``query_norm``, ``keys``, ``experts``), so ``keys.left`` or
    ``query_norm.mean`` come out of ``state_dict()`` and go into ``load_state_dict()`` as is.
    ``forward`` returns y only; the routing of the last call is kept on ``self.last_aux``
    ({"indices", "scores", "weights"}, detached). In training mode the batch-norm buffers
    are updated in place.

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
    """

    def __init__(self, cfg, seed=0, dtype=None, device=None, implementation=None):
        super().__init__()
        check_known("torch", implementation, IMPLEMENTATIONS)  # whether it runs depends on each call's device
        self.cfg = cfg
        self.implementation = implementation
        params, state = init(cfg, seed=seed, dtype=dtype, device=device)
        for name, value in params.items():
            self._owner(name).register_parameter(name.split(".")[1], nn.Parameter(value))
        for name, value in state.items():
            self._owner(name).register_buffer(name.split(".")[1], value)
        self.last_aux = None

    def _owner(self, name):
        group = name.split(".")[0]
        if group not in self._modules:
            self.add_module(group, nn.Module())
        return self._modules[group]

    def params_and_state(self):
        """The functional ``(params, state)`` dicts.

        Parameters are the module's own tensors. The state is the module's own buffers when
        their dtype is the functional one (``peer_ref.checks.state_dtype`` of the parameters'),
        else float32 copies (a module cast to bfloat16/float16 after construction).
        """
        params = dict(self.named_parameters())
        want = native_dtype(checks.state_dtype(dtype_name(self.experts.down)))
        return params, {name: value.to(want) for name, value in self.named_buffers()}

    def load_params_and_state(self, params, state):
        """Load functional dicts (canonical names) after checking names, shapes and dtypes."""
        dtype = checks.check_trees(self.cfg, params, state, meta)
        own = dtype_name(self.experts.down)
        if dtype != own:
            raise PEERInputError(f"params dtype={dtype}, but expected {own} (the module's; nothing is cast)")
        self.load_state_dict({**params, **state}, strict=True)

    def forward(self, x, mask=None, routing=None):
        params, state = self.params_and_state()
        device_type = x.device.type if isinstance(x, torch.Tensor) else "cpu"
        x, low = self._autocast(device_type, x, params["experts.down"].dtype)
        implementation = choose_implementation(self.implementation, x.device if isinstance(x, torch.Tensor)
                                               else "cpu", params)
        # PEER prescribes its own precision per step; autocast must not re-cast its matmuls and batch norm.
        with torch.autocast(device_type, enabled=False):
            lead = validate(self.cfg, params, state, x, self.training, mask, routing, compute_dtype=low).lead
            y, new_state, indices, scores, weights = forward(
                self.cfg, self.training, params, state, x, mask, routing, low=low, implementation=implementation)
        if self.training and new_state:
            with torch.no_grad():
                for name, value in new_state.items():
                    self.get_buffer(name).copy_(value)  # rounds to the buffer's dtype (see class doc)
        self.last_aux = routing_aux(self.cfg, lead, indices, scores, weights)
        return y.reshape(lead + (self.cfg.d_out,))

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
        if self.implementation is None:
            return repr(self.cfg)
        return f"{self.cfg!r}, implementation={self.implementation!r}"
