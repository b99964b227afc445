"""Backend lookup. Frameworks are imported lazily: they may be missing, heavy or broken,
so nothing here imports one until a backend is asked for by name."""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType
from typing import Any, NamedTuple

from peer_ref.errors import PEERConfigError

ENV_VAR = "PEER_BACKEND"
DEFAULT = "numpy"


class Entry(NamedTuple):
    module: str  # the backend module implementing the contract (see contract.py)
    framework: str  # the top-level package it needs
    extra: str  # the pip extra that installs it


BACKENDS: dict[str, Entry] = {
    "numpy": Entry("peer_backends.numpy", "numpy", "(none: numpy is a core dependency)"),
    "torch": Entry("peer_backends.torch", "torch", "torch"),
    "jax": Entry("peer_backends.jax", "jax", "jax"),
    "tensorflow": Entry("peer_backends.tensorflow", "tensorflow", "tensorflow"),
}
ALIASES = {"np": "numpy", "ref": "numpy", "reference": "numpy", "pytorch": "torch", "tf": "tensorflow"}


def _missing(name: str, entry: Entry, package: str) -> ImportError:
    command = f'pip install "peer-layer[{entry.extra}]"'
    return ImportError(
        f"backend={name!r} needs the {package!r} package, which is not installed; "
        f"install the backend's extra: {command}"
    )


def canonical(name: str) -> str:
    key = name.strip().lower()
    return ALIASES.get(key, key)


def available() -> list[str]:
    """Names of the built-in backends whose framework is installed (nothing is imported)."""
    return [name for name, entry in BACKENDS.items() if importlib.util.find_spec(entry.framework)]


def get(name: str | None = None) -> ModuleType | Any:
    """The backend called ``name`` (default: ``$PEER_BACKEND``, else "numpy").

    ``name`` is a built-in backend name or alias, or the import path of a third-party
    backend implementing the same contract: ``"package.module"`` (the module itself) or
    ``"package.module:attribute"`` (an object in it).
    """
    if name is None:
        name = os.environ.get(ENV_VAR) or DEFAULT
    if not isinstance(name, str) or not name.strip():
        raise PEERConfigError(f"backend={name!r}, but expected one of {sorted(BACKENDS)} or a module path")
    key = canonical(name)
    if key in BACKENDS:
        entry = BACKENDS[key]
        if importlib.util.find_spec(entry.framework) is None:
            raise _missing(name, entry, entry.framework)
        try:
            return importlib.import_module(entry.module)
        except ModuleNotFoundError as err:  # a package the extra brings beside the framework (flax, keras)
            if err.name is None or err.name.partition(".")[0] in ("peer_backends", "peer_ref"):
                raise
            raise _missing(name, entry, err.name) from err
    if "." in name or ":" in name:
        module_name, _, attribute = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            raise PEERConfigError(f"backend={name!r}: module not found ({err})") from None
        if not attribute:
            return module
        if not hasattr(module, attribute):
            raise PEERConfigError(f"backend={name!r}: module {module_name!r} has no attribute {attribute!r}")
        return getattr(module, attribute)
    raise PEERConfigError(
        f"backend={name!r}, but expected one of {sorted(BACKENDS)} (aliases {sorted(ALIASES)}) "
        "or the import path ('pkg.module' or 'pkg.module:attr') of a backend implementing the contract"
    )
