"""The one distribution holds every package and the spec data, whether installed editable or as a wheel."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = [
    "peer_ref",
    "peer_spec",
    "peer_backends",
    "peer_backends.numpy",
    "peer_conformance",
    "peer_bench",
    "peer_train",
]


def test_installed_packages_import():
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    result = subprocess.run([sys.executable, "-c", code, *PACKAGES], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = out.glob("peer_layer-*.whl")
    return path


def test_wheel_contains_every_package_and_the_spec(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in PACKAGES + [
        "peer_backends.torch",
        "peer_backends.jax",
        "peer_backends.tensorflow",
        "peer_backends.keras",
    ]:
        assert f"{package.replace('.', '/')}/__init__.py" in names, f"wheel lacks package {package}"
    assert "peer_spec/SPEC.md" in names
    assert len([n for n in names if n.startswith("peer_spec/vectors/") and n.endswith(".npz")]) >= 10
    assert "peer_conformance/divergences.toml" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "peer_conformance.plugin" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_wheel_imports_every_package(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path)
    code = (
        "import importlib, sys\nfor name in sys.argv[1:]:\n"
        "    module = importlib.import_module(name)\n"
        f"    assert module.__file__.startswith({str(tmp_path)!r}), module.__file__\n"
        "import peer_spec; assert len(peer_spec.vector_paths()) >= 10\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *PACKAGES],
        capture_output=True,
        text=True,
        cwd="/",
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr


# Frameworks a user brings along: an extra may ask for a range of them, never for one release
# (an exact pin replaces the user's build, or makes their requirements unresolvable).
FRAMEWORKS = {"torch", "jax", "jaxlib", "flax", "tensorflow", "tensorflow-cpu", "keras"}


def _metadata() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _pins(requirement: str) -> list[str]:
    """The specifiers of one requirement that admit a single release (== without a wildcard, ===)."""
    from packaging.requirements import Requirement

    req = Requirement(requirement)
    return [
        str(s) for s in req.specifier if s.operator == "===" or (s.operator == "==" and not s.version.endswith(".*"))
    ]


def test_pins_are_detected():
    assert _pins("torch==2.13.0") == ["==2.13.0"]
    assert _pins("torch===2.13.0") == ["===2.13.0"]
    assert _pins("torch>=2.13,==2.13.0; python_version >= '3.11'") == ["==2.13.0"]
    assert _pins("torch>=2.13") == [] and _pins("torch==2.*") == []


def test_no_extra_pins_a_framework():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    extras = _metadata()["optional-dependencies"]
    pinned = [
        f"[{extra}] {requirement}"
        for extra, requirements in extras.items()
        for requirement in requirements
        if canonicalize_name(Requirement(requirement).name) in FRAMEWORKS and _pins(requirement)
    ]
    assert not pinned, f"extras pin a framework to one release (use a range; pins go in constraints/ci.txt): {pinned}"
    named = {canonicalize_name(Requirement(r).name) for requirements in extras.values() for r in requirements}
    assert {"torch", "jax", "tensorflow-cpu", "keras"} <= named, sorted(named)


def test_ci_pins_live_in_the_constraints_file_nox_uses():
    from packaging.requirements import Requirement

    lines = [line.split("#")[0].strip() for line in (ROOT / "constraints" / "ci.txt").read_text().splitlines()]
    pins = {Requirement(line).name: line for line in lines if line}
    assert pins["torch"] == "torch==2.13.0"  # the CPU build, on local disk: the sessions install it in seconds
    assert '"-c", "constraints/ci.txt"' in (ROOT / "noxfile.py").read_text()


def test_the_conformance_extra_installs_what_the_suite_needs():
    from packaging.requirements import Requirement

    extras = _metadata()["optional-dependencies"]
    assert {Requirement(r).name for r in extras["conformance"]} >= {"pytest", "hypothesis"}


def test_requires_python_admits_no_release_the_sources_cannot_run_on():
    # tomllib (the conformance suite reads TOML divergence files) is new in Python 3.11.
    from packaging.specifiers import SpecifierSet

    sources = [
        p
        for folder in ("peer_ref", "spec", "backends", "conformance", "bench", "train")
        for p in (ROOT / folder).rglob("*.py")
    ]
    uses_tomllib = [str(p.relative_to(ROOT)) for p in sources if "import tomllib" in p.read_text()]
    if uses_tomllib:
        assert "3.10" not in SpecifierSet(_metadata()["requires-python"]), uses_tomllib
