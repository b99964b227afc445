"""The conformance plugin is inert unless asked: in a pytest run that names no PEER backend it
imports neither Hypothesis nor a framework, loads no profile and suppresses no health check.

Each test runs pytest in a fresh process on a small unrelated suite written to a temporary folder.
"""

import os
import subprocess
import sys
import textwrap

# Keeps named top-level packages unimportable, as in an environment that lacks them; pytest runs
# with Hypothesis's own plugin off (that environment would not have it).
BLOCKING_RUNNER = """
import sys

BLOCKED = {"hypothesis", "_hypothesis_pytestplugin", "_hypothesis_globals", "torch", "jax", "tensorflow"}


class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Missing())
import pytest

sys.exit(pytest.main(["-p", "no:hypothesispytest", *sys.argv[1:]]))
"""


def _run(folder, files: dict, *command: str) -> subprocess.CompletedProcess:
    for name, text in files.items():
        (folder / name).write_text(textwrap.dedent(text))
    env = {k: v for k, v in os.environ.items() if k not in ("PEER_BACKEND", "CI", "PYTEST_ADDOPTS")}
    return subprocess.run(
        [sys.executable, *command, "-p", "no:cacheprovider", "-q"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_unrelated_suite_keeps_its_own_profile(tmp_path):
    files = {
        "conftest.py": """
            from hypothesis import settings
            settings.register_profile("theirs", max_examples=7)
            settings.load_profile("theirs")
        """,
        "test_theirs.py": """
            import sys
            from hypothesis import given, settings, strategies as st

            def test_profile_and_health_checks_are_theirs():
                assert "peer_conformance.plugin" in sys.modules  # loaded, through its entry point
                assert settings.get_current_profile_name() == "theirs"
                assert settings.default.max_examples == 7
                assert not settings.default.suppress_health_check

            def test_no_framework_imported():
                loaded = {"torch", "jax", "tensorflow", "peer_backends"} & set(sys.modules)
                assert not loaded, loaded

            @given(st.integers())
            def test_a_property(n):
                assert n == n
        """,
    }
    result = _run(tmp_path, files, "-m", "pytest")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "3 passed" in result.stdout, result.stdout[-3000:]


def test_unrelated_suite_runs_without_hypothesis(tmp_path):
    files = {
        "runner.py": BLOCKING_RUNNER,
        "test_plain.py": """
            import sys

            def test_runs():
                assert "peer_conformance.plugin" in sys.modules  # loaded, through its entry point
                assert "hypothesis" not in sys.modules
        """,
    }
    result = _run(tmp_path, files, "runner.py", "test_plain.py")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "1 passed" in result.stdout, result.stdout[-3000:]


def test_the_blocker_really_hides_hypothesis(tmp_path):
    """The runner above must make ``import hypothesis`` fail, or the test before it proves nothing."""
    files = {"runner.py": BLOCKING_RUNNER, "test_import.py": "def test_import():\n    import hypothesis\n"}
    result = _run(tmp_path, files, "runner.py", "test_import.py")
    assert result.returncode == 1 and "ModuleNotFoundError" in result.stdout, result.stdout[-3000:]
