"""Fixtures shared by the project's own tests (frameworks are imported only by the tests that ask)."""

import os
import pathlib
import re

import pytest
from hypothesis import settings

from peer_conformance.plugin import register_profiles

# The project's own tests use the conformance suite's profiles (peer-dev, peer-ci, ...), which its
# plugin registers only in runs that name a backend; --hypothesis-profile overrides this default.
register_profiles()
settings.load_profile("peer-ci" if os.environ.get("CI") else "peer-dev")

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def x64():
    """Turn JAX's process-wide x64 mode on for one test and restore it after."""
    import jax

    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)


@pytest.fixture
def run_readme_example(tmp_path, monkeypatch):
    """run_readme_example(heading): run, as written and in a fresh folder, the first Python block
    under ``#### heading`` in the README's "The layers in training setups" section."""

    def run(heading):
        section = README.read_text().split("## The layers in training setups", 1)[1]
        section = section.split(f"\n#### {heading}\n", 1)[1]
        code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
        monkeypatch.chdir(tmp_path)
        exec(compile(code, f"README.md ({heading} example)", "exec"), {})

    return run
