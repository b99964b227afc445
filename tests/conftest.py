"""Fixtures shared by the project's own tests (frameworks are imported only by the tests that ask)."""

import pytest


@pytest.fixture
def x64():
    """Turn JAX's process-wide x64 mode on for one test and restore it after."""
    import jax

    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)

