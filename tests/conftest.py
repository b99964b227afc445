"""Fixtures shared by the project's own tests (frameworks are imported only by the tests that ask)."""

import os

import pytest
from hypothesis import settings

from peer_conformance.plugin import register_profiles

# The project's own tests use the conformance suite's profiles (peer-dev, peer-ci, ...), which its
# plugin registers only in runs that name a backend; --hypothesis-profile overrides this default.
register_profiles()
settings.load_profile("peer-ci" if os.environ.get("CI") else "peer-dev")


@pytest.fixture
def x64():
    """Turn JAX's process-wide x64 mode on for one test and restore it after."""
    import jax

    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)


@pytest.fixture
def unresolved_roles():
    """unresolved_roles(backend): the names of peer_backends.contract.ROLES that ``backend``
    ("numpy", "torch", "jax", "tensorflow") lacks; imports that backend's modules only."""
    return _unresolved_roles


def _unresolved_roles(backend: str) -> list[str]:
    import importlib

    from peer_backends.contract import ROLES

    missing = []
    for role in ROLES:
        path = role.numpy if backend == "numpy" else f"peer_backends.{backend}.{role.name}"
        if path is None:
            continue
        module, _, attribute = path.rpartition(".")
        if not hasattr(importlib.import_module(module), attribute):
            missing.append(f"{path} ({role.role})")
    return missing
