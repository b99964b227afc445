"""Array conversion and dtype names for the JAX backend.

JAX keeps 64-bit types only in its x64 mode, and outside it turns float64 into
float32 without a word. The contract says nothing is cast, so converting a float64
array (or asking for float64 parameters) with x64 off is refused, naming the fix.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from peer_ref.errors import PEERInputError

from .._tree import map_tree

version = jax.__version__

X64_FIX = "enable it first with jax.config.update('jax_enable_x64', True) or JAX_ENABLE_X64=1"


def x64_enabled() -> bool:
    return bool(jax.config.jax_enable_x64)


def require_x64(what: str) -> None:
    """Refuse float64 ``what`` while x64 is off, because JAX would silently make it float32."""
    if not x64_enabled():
        raise PEERInputError(
            f"{what} is float64, but JAX's 64-bit mode (jax_enable_x64) is off and would "
            f"truncate it to float32; {X64_FIX}"
        )


def index_dtype():
    """The integer dtype of expert indices: int64 under x64, int32 otherwise."""
    return jnp.int64 if x64_enabled() else jnp.int32


def dtype_name(array) -> str:
    dtype = getattr(array, "dtype", None)
    return np.dtype(dtype).name if dtype is not None else np.asarray(array).dtype.name


def meta(value) -> tuple[tuple[int, ...], str]:
    """(shape, dtype name) of an array, as peer_ref.checks reads it."""
    return tuple(np.shape(value)), dtype_name(value)


def _to_jax(value):
    array = np.asarray(value)
    if not x64_enabled():
        if array.dtype == np.float64:
            require_x64(f"an array of shape {array.shape}")
        if array.dtype in (np.int64, np.uint64):
            # Indices (routing) fit in 32 bits; convert them only when no value changes.
            narrow = np.int32 if array.dtype == np.int64 else np.uint32
            converted = array.astype(narrow)
            if not np.array_equal(converted, array):
                raise PEERInputError(
                    f"an {array.dtype} array of shape {array.shape} has values outside {np.dtype(narrow).name}, "
                    f"but JAX's 64-bit mode is off; {X64_FIX}"
                )
            array = converted
    return jnp.asarray(array)


def from_numpy(tree):
    return map_tree(_to_jax, tree)


def to_numpy(tree):
    """NumPy arrays; a row-sparse gradient (``peer_backends.jax.RowSparse``) becomes
    ``peer_ref.RowSparse`` with its padding stripped (SPEC §7.1)."""
    return map_tree(_leaf_to_numpy, tree)


def _leaf_to_numpy(value):
    from .sparse import RowSparse  # the row-sparse gradient is a leaf of map_tree's trees

    return value.to_numpy() if isinstance(value, RowSparse) else np.asarray(value)


# float32 means float32 (SPEC §10.1): on GPUs XLA would otherwise use TF32 in matrix products.
HIGHEST = lax.Precision.HIGHEST

_NATIVE_DTYPES = {"float64": jnp.float64, "float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def native_dtype(name: str):
    """The JAX dtype of a dtype name of peer_ref.config.DTYPES ("float32" -> jnp.float32)."""
    return _NATIVE_DTYPES[name]


def __getattr__(name):
    if name == "DTYPES":  # the old name of the dtype map, which clashed with peer_ref.config.DTYPES (names)
        warnings.warn(
            "peer_backends.jax.core.DTYPES is deprecated; use native_dtype(name)", DeprecationWarning, stacklevel=2
        )
        return dict(_NATIVE_DTYPES)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def read(rows, low):
    """Rows as the computation reads them: rounded to nearest-even in the dtype named ``low``
    and widened back (exact) in the mixed mode, unchanged for ``low`` None (SPEC §10.3)."""
    return rows if low is None else rows.astype(native_dtype(low)).astype(rows.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def round_through(value, low):
    """``read(value, low)`` whose gradient passes unchanged (straight-through, SPEC §10.3)."""
    return read(value, low)


round_through.defvjp(lambda value, low: (round_through(value, low), None), lambda low, _, grad: (grad,))
