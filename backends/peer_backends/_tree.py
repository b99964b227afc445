"""Mapping over the (nested) dict/tuple/list trees that backends convert."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def map_tree(fn: Callable[[Any], Any], tree: Any) -> Any:
    """Apply ``fn`` to every leaf; dicts, tuples (NamedTuples too) and lists are containers, None passes."""
    if tree is None:
        return None
    if isinstance(tree, dict):
        return {key: map_tree(fn, value) for key, value in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(map_tree(fn, value) for value in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(map_tree(fn, value) for value in tree)
    return fn(tree)
