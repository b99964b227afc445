"""pytest plugin of the PEER conformance suite.

Registered through the ``pytest11`` entry point, so it loads in every pytest run of an
environment where this distribution is installed; it only adds options, Hypothesis
profiles and the ``backend`` fixture, and imports no framework until a test asks.

    pytest --pyargs peer_conformance --peer-backend torch      # one backend
    pytest --pyargs peer_conformance --peer-backend all        # every installed backend
    pytest --pyargs peer_conformance --peer-backend my_pkg.peer_backend   # a third party's
    pytest --pyargs peer_conformance --peer-backend torch --peer-implementation triton   # one kernel path

The backend defaults to $PEER_BACKEND. Hypothesis profiles: ``dev`` (quick), ``ci``
(200 examples for the core properties, derandomized), ``thorough``, ``kernels`` (8, for
interpreted kernels); pick one with
``--hypothesis-profile`` (default: ``ci`` when $CI is set, else ``dev``).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import pytest
import tomllib
from hypothesis import HealthCheck, settings

_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("dev", max_examples=25, deadline=None, suppress_health_check=_SUPPRESS)
settings.register_profile(
    "ci", max_examples=200, deadline=None, derandomize=True, suppress_health_check=_SUPPRESS, print_blob=True
)
settings.register_profile("thorough", max_examples=2000, deadline=None, suppress_health_check=_SUPPRESS)
# For implementations run under an interpreter (Triton's, Pallas's), where one example costs seconds.
settings.register_profile(
    "kernels", max_examples=8, deadline=None, derandomize=True, suppress_health_check=_SUPPRESS, print_blob=True
)

_PACKAGE = "peer_conformance"


def pytest_addoption(parser):
    group = parser.getgroup("peer", "PEER conformance")
    group.addoption(
        "--peer-backend",
        default=None,
        help="backend under test: a built-in name (numpy, torch, jax, tensorflow), 'all' for every "
        "installed one, or the dotted path of a module implementing peer_backends.contract "
        "(default: $PEER_BACKEND)",
    )
    group.addoption(
        "--peer-implementation",
        default=None,
        help="expert-stage implementation every apply/vjp call of the suite passes "
        "(implementation=NAME, one of the backend's `implementations`; default: none passed, "
        "the backend picks)",
    )
    group.addoption(
        "--peer-divergences",
        default=None,
        help="TOML file of known divergences (skips/xfails) to use instead of the built-in one",
    )


def pytest_configure(config):
    if not config.getoption("--hypothesis-profile", default=None):
        settings.load_profile("ci" if os.environ.get("CI") else "dev")
    if _requested(config):
        _load_torch_before_tensorflow()


def _load_torch_before_tensorflow():
    """The checkpoint tests load every installed backend into one process; where both torch and
    TensorFlow are installed, torch has to be imported first or their native libraries clash."""
    import importlib.util

    if importlib.util.find_spec("torch") and importlib.util.find_spec("tensorflow"):
        import torch  # noqa: F401


def _requested(config) -> list[str]:
    name = config.getoption("--peer-backend") or os.environ.get("PEER_BACKEND")
    if not name:
        return []
    import peer_backends

    if name == "all":
        return peer_backends.available()
    return [name]


def _is_conformance(item_or_module) -> bool:
    return getattr(item_or_module, "__name__", "").startswith(_PACKAGE + ".") or (
        _PACKAGE in Path(str(getattr(item_or_module, "path", ""))).parts
    )


def pytest_generate_tests(metafunc):
    if "backend" not in metafunc.fixturenames or not _is_conformance(metafunc.module):
        return
    names = _requested(metafunc.config)
    if not names:
        raise pytest.UsageError(
            "the PEER conformance suite needs a backend: pass --peer-backend NAME "
            "(numpy, torch, jax, tensorflow, all, or a module path) or set $PEER_BACKEND"
        )
    metafunc.parametrize("backend", names, indirect=True, scope="session")


@pytest.fixture(scope="session")
def backend(request):
    """The backend module under test (see peer_backends.contract)."""
    import peer_backends
    from peer_backends.contract import ATTRIBUTES

    be = peer_backends.get(request.param)
    missing = [attr for attr in ATTRIBUTES if not hasattr(be, attr)]
    if missing:
        pytest.fail(f"backend {request.param!r} lacks contract attributes {missing}", pytrace=False)
    from .helpers import prepare, with_implementation

    implementation = request.config.getoption("--peer-implementation")
    if implementation is not None:
        be = with_implementation(be, implementation)
    return prepare(be)


def pytest_report_header(config):
    names = _requested(config)
    if not names:
        return None
    lines = []
    import peer_backends

    for name in names:
        try:
            be = peer_backends.get(name)
            caps = ",".join(sorted(be.capabilities))
            lines.append(f"peer backend: {be.name} (framework {be.version}; capabilities {caps})")
        except Exception as err:  # report, the fixture will fail the tests with the same error
            lines.append(f"peer backend: {name} (unavailable: {err})")
    implementation = config.getoption("--peer-implementation")
    if implementation is not None:
        lines.append(f"peer implementation: {implementation}")
    lines.append(f"hypothesis profile: {settings.get_current_profile_name()}")
    return lines


def _load_divergences(config) -> dict:
    path = config.getoption("--peer-divergences")
    if path:
        return tomllib.loads(Path(path).read_text())
    return tomllib.loads(resources.files(_PACKAGE).joinpath("divergences.toml").read_text())


def pytest_collection_modifyitems(config, items):
    """Apply known divergences: ``[backend] xfail/skip = [{test = "name", reason = "..."}]``."""
    if not _requested(config):
        return
    table = _load_divergences(config)
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None or "backend" not in callspec.params or not _is_conformance(item):
            continue
        import peer_backends._registry as registry

        entries = table.get(registry.canonical(callspec.params["backend"]), {})
        base = item.originalname or item.name
        for kind in ("skip", "xfail"):
            for entry in entries.get(kind, []):
                if entry["test"] in (base, item.name):
                    marker = pytest.mark.skip if kind == "skip" else pytest.mark.xfail
                    item.add_marker(marker(reason=entry["reason"]))


def pytest_runtest_teardown(item, nextitem):
    """At the end of each conformance module, let the backend drop its compiled specialisations."""
    callspec = getattr(item, "callspec", None)
    if callspec is None or "backend" not in callspec.params or not _is_conformance(item):
        return
    if nextitem is not None and nextitem.module is item.module:
        return
    import peer_backends

    clear = getattr(peer_backends.get(callspec.params["backend"]), "clear_caches", None)
    if clear is not None:
        clear()
