import warnings

import ml_dtypes
import numpy as np
import torch

from peer_ref import RowSparse

from .._tree import map_tree

version = torch.__version__


def _to_tensor(leaf):
    if isinstance(leaf, torch.Tensor):
        return leaf
    array = np.asarray(leaf)
    # NumPy has no native bfloat16: move the raw bits so no value is rounded on the way.
    if array.dtype == ml_dtypes.bfloat16:
        tensor = torch.from_numpy(np.array(array.view(np.int16), copy=True)).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(np.array(array, copy=True))
    return tensor.to(torch.get_default_device())


def _to_array(leaf):
    if not isinstance(leaf, torch.Tensor):
        return np.asarray(leaf)
    if type(leaf).__name__ == "DTensor":
        from peer_ref.errors import PEERInputError

        raise PEERInputError(
            f"a DTensor of shape {tuple(leaf.shape)} with placements {leaf.placements}, but expected a whole "
            "tensor: gather a sharded layer with peer_backends.torch.parallel.gather_params_and_state "
            "(a collective, on every rank) first"
        )
    if leaf.layout == torch.sparse_coo:  # a row-sparse table gradient (SPEC §7.1)
        leaf = leaf.detach().coalesce()
        return RowSparse(_to_array(leaf.indices()[0]).astype(np.int64), _to_array(leaf.values()))
    tensor = leaf.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().copy().view(ml_dtypes.bfloat16)
    return tensor.numpy().copy()


def from_numpy(tree):
    """NumPy arrays (or nested containers of them) to tensors on torch's default device (the CPU unless
    ``torch.set_default_device`` says otherwise); copies, never casts."""
    return map_tree(_to_tensor, tree)


def to_numpy(tree):
    """Tensors on any device to NumPy arrays; bfloat16 becomes ml_dtypes.bfloat16, bit for bit. A
    sparse COO tensor (a row-sparse table gradient, SPEC §7.1) becomes ``peer_ref.RowSparse``
    (rows int64 (U,), values (U, ...)), coalesced first where it is not."""
    return map_tree(_to_array, tree)


def dtype_name(tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def meta(value) -> tuple[tuple[int, ...], str]:
    """(shape, dtype name) of a tensor (or NumPy array), as peer_ref.checks reads it."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), dtype_name(value)
    array = np.asarray(value)
    return array.shape, array.dtype.name


def native_dtype(name: str) -> torch.dtype:
    """The torch dtype of a dtype name of peer_ref.config.DTYPES ("float32" -> torch.float32)."""
    return getattr(torch, name)


def torch_dtype(name: str) -> torch.dtype:
    """Deprecated: ``native_dtype`` (the name every backend's core module uses)."""
    warnings.warn(
        "peer_backends.torch.core.torch_dtype is deprecated; use native_dtype", DeprecationWarning, stacklevel=2
    )
    return native_dtype(name)


@torch.library.custom_op("peer::round_through", mutates_args=())
def _round_through_op(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """value rounded to nearest-even in ``dtype`` and widened back to value's dtype (exact).

    An opaque operator so that torch.compile cannot fold the two casts away (SPEC §10.3 needs
    the rounding); its gradient passes unchanged (straight-through).
    """
    return value.to(dtype).to(value.dtype)


@_round_through_op.register_fake
def _(value, dtype):
    return torch.empty_like(value)


_round_through_op.register_autograd(lambda ctx, grad: (grad, None), setup_context=lambda ctx, inputs, output: None)


def round_through(value, low):
    """``value`` rounded to nearest-even in ``low`` (a torch dtype) and widened back; the gradient
    passes unchanged (straight-through, SPEC §10.3). The operator peer::round_through, and under
    a torch.func transform (``transformed()``) the same in plain differentiable ops."""
    if transformed():
        return value + (value.to(low).to(value.dtype) - value).detach()
    return torch.ops.peer.round_through(value, low)


def transformed() -> bool:
    """Whether a torch.func transform (grad, vjp, jvp, jacrev, jacfwd, vmap, functionalize) is
    running. The peer:: operators' autograd formulas are generated autograd.Functions, which
    torch.func cannot transform (they lack setup_context, a torch limitation), so under a
    transform the forward runs the same math in plain differentiable torch operations. False
    while torch.compile traces (where dynamo keeps an interpreter of its own)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.peek_interpreter_stack() is not None


def unwrapped(value):
    """``value`` with every torch.func wrapper (gradient tracking, dual numbers) removed: the
    plain tensor of its values, for buffers that a transform must not differentiate or batch."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(value):
        if functorch.is_batchedtensor(value):
            return None
        value = functorch.get_unwrapped(value)
    return value
