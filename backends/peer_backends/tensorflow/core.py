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
