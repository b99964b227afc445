import warnings

import numpy as np
import tensorflow as tf

from .._tree import map_tree

version = tf.__version__


def _to_tensor(value):
    if isinstance(value, (tf.Tensor, tf.Variable)):
        return value
    # np.asarray keeps the dtype; ml_dtypes.bfloat16 is TF's own bfloat16 NumPy type.
    return tf.convert_to_tensor(np.asarray(value))


def _to_array(value):
    if isinstance(value, tf.IndexedSlices):  # a row-sparse table gradient (SPEC §7.1)
        import peer_ref

        return peer_ref.RowSparse(value.indices.numpy().astype(np.int64), value.values.numpy())
    if isinstance(value, (tf.Tensor, tf.Variable)):
        return value.numpy()
    return np.asarray(value)


def from_numpy(tree):
    return map_tree(_to_tensor, tree)


def to_numpy(tree):
    return map_tree(_to_array, tree)


def dtype_name(value) -> str:
    if isinstance(value, (tf.Tensor, tf.Variable)):
        return value.dtype.name
    return np.asarray(value).dtype.name


_NATIVE_DTYPES = {"float64": tf.float64, "float32": tf.float32, "bfloat16": tf.bfloat16, "float16": tf.float16}


def native_dtype(name: str) -> tf.DType:
    """The TensorFlow dtype of a dtype name of peer_ref.config.DTYPES ("float32" -> tf.float32)."""
    return _NATIVE_DTYPES[name]


def meta(value) -> tuple[tuple[int, ...], str]:
    """(shape, dtype name) of a tensor (or NumPy array), as peer_ref.checks reads it."""
    return tuple(value.shape), dtype_name(value)


def __getattr__(name):
    if name == "TF_DTYPES":  # the old name of the dtype map
        warnings.warn(
            "peer_backends.tensorflow.core.TF_DTYPES is deprecated; use native_dtype(name)",
            DeprecationWarning,
            stacklevel=2,
        )
        return dict(_NATIVE_DTYPES)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def read(rows, low):
    """Rows as the computation reads them: rounded to nearest-even in the dtype named ``low``
    and widened back (exact) in the mixed mode, unchanged for ``low`` None (SPEC §10.3)."""
    return rows if low is None else tf.cast(tf.cast(rows, native_dtype(low)), rows.dtype)


def round_through(value, low):
    """``read(value, low)`` whose gradient passes unchanged (straight-through, SPEC §10.3)."""

    @tf.custom_gradient
    def run(v):
        return read(v, low), lambda grad: grad

    return run(value)


def zero_masked(rows, mask):
    # A select, not a product: 0 * NaN would be NaN.
    return tf.where(mask[:, None], rows, tf.zeros_like(rows))
