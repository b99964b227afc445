"""A missing optional dependency names the extra that installs it (each case in a fresh process,
the module hidden by `sys.modules[name] = None`, as if it were not installed)."""

import importlib.util
import subprocess
import sys

import pytest


def _run(hidden: list[str], code: str) -> subprocess.CompletedProcess:
    prelude = f"import sys\nfor name in {hidden!r}:\n    sys.modules[name] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=300)


def test_backend_without_its_framework_names_the_extra():
    result = _run(["torch"], "import peer_backends\npeer_backends.get('torch')")
    assert result.returncode == 1
    assert (
        "backend='torch' needs the 'torch' package, which is not installed; "
        'install the backend\'s extra: pip install "peer-layer[torch]"'
    ) in result.stderr


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="needs jax installed (flax is hidden)")
def test_backend_without_a_package_of_its_extra_names_the_extra():
    result = _run(["flax"], "import peer_backends\npeer_backends.get('jax')")
    assert result.returncode == 1
    assert "backend='jax' needs the 'flax' package" in result.stderr
    assert 'pip install "peer-layer[jax]"' in result.stderr


def test_bench_without_its_extra_names_the_extra():
    result = _run(["rich"], "from peer_bench.cli import main\nmain(['--preset', 'smoke', '--backends', 'numpy'])")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: python -m peer_bench needs rich, which the 'bench' extra installs: pip install \"peer-layer[bench]\""
    )


def test_train_without_its_extra_names_the_extra():
    result = _run(["matplotlib", "jax"], "from peer_train.cli import main\nmain(['train', '--backend', 'jax'])")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: python -m peer_train needs matplotlib, jax, which the 'train' extra installs: "
        'pip install "peer-layer[train]"'
    )
