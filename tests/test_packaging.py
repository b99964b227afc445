"""The one distribution holds every package and the spec data, whether installed editable or as a wheel."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["peer_ref", "peer_spec", "peer_backends", "peer_backends.numpy", "peer_conformance", "peer_bench",
            "peer_train"]


def test_installed_packages_import():
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    result = subprocess.run([sys.executable, "-c", code, *PACKAGES], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = out.glob("peer_layer-*.whl")
    return path


def test_wheel_contains_every_package_and_the_spec(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in PACKAGES + ["peer_backends.torch", "peer_backends.jax", "peer_backends.tensorflow",
                               "peer_backends.keras"]:
        assert f"{package.replace('.', '/')}/__init__.py" in names, f"wheel lacks package {package}"
    assert "peer_spec/SPEC.md" in names
    assert len([n for n in names if n.startswith("peer_spec/vectors/") and n.endswith(".npz")]) >= 10
    assert "peer_conformance/divergences.toml" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "peer_conformance.plugin" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_wheel_imports_every_package(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path)
    code = ("import importlib, sys\nfor name in sys.argv[1:]:\n"
            "    module = importlib.import_module(name)\n"
            f"    assert module.__file__.startswith({str(tmp_path)!r}), module.__file__\n"
            "import peer_spec; assert len(peer_spec.vector_paths()) >= 10\n")
    result = subprocess.run([sys.executable, "-c", code, *PACKAGES], capture_output=True, text=True, cwd="/",
                            env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
