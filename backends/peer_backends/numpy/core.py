import numpy as np

from .._tree import map_tree

version = np.__version__


def from_numpy(tree):
    return map_tree(np.asarray, tree)


def to_numpy(tree):
    return map_tree(np.asarray, tree)


def dtype_name(array) -> str:
    return np.asarray(array).dtype.name
