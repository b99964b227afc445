"""pytest plugin of the PEER conformance suite.

Registered through the ``pytest11`` entry point, so it loads in every pytest run of an
environment where this distribution is installed. Unless a backend is named (``--peer-backend``
or $PEER_BACKEND) it only adds its options: it imports neither Hypothesis nor a framework,
registers no Hypothesis profile and suppresses no health check.

    pytest --pyargs peer_conformance --peer-backend torch      # one backend
    pytest --pyargs peer_conformance --peer-backend all        # every installed backend
    pytest --pyargs peer_conformance --peer-backend my_pkg.peer_backend   # a third party's
    pytest --pyargs peer_conformance --peer-backend torch --peer-implementation triton   # one kernel path

Hypothesis profiles, registered when a backend is named: ``peer-dev`` (quick), ``peer-ci``
(80 examples for the core properties, derandomized), ``peer-thorough`` (2000, random configs),
``peer-kernels`` (8, for interpreted kernels); pick one with ``--hypothesis-profile`` (default:
``peer-ci`` when $CI is set, else ``peer-dev``). At the end of a run the suite prints its verdict,
one line per spec section (``peer_conformance.verdict``); ``--peer-verdict-json`` and
``--peer-verdict-md`` write it to files.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import pytest

_PACKAGE = "peer_conformance"
PROFILES = ("peer-dev", "peer-ci", "peer-thorough", "peer-kernels")
ERROR_LEVELS = ("message", "kind")


def register_profiles() -> None:
    """Register the suite's Hypothesis profiles (``PROFILES``); loads none."""
    from hypothesis import HealthCheck, Phase, settings

    suppress = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    # No explain phase: it re-runs a failing test many times to annotate the failing input, which
    # costs a minute on an implementation whose error path is slow (einx's shape solver, say).
    common = dict(deadline=None, suppress_health_check=suppress, phases=[p for p in Phase if p is not Phase.explain])
    settings.register_profile("peer-dev", max_examples=25, **common)
    settings.register_profile("peer-ci", max_examples=80, derandomize=True, print_blob=True, **common)
    settings.register_profile("peer-thorough", max_examples=2000, **common)
    # For implementations run under an interpreter (Triton's, Pallas's), where one example costs seconds.
    settings.register_profile("peer-kernels", max_examples=8, derandomize=True, print_blob=True, **common)


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
    group.addoption(
        "--peer-errors",
        default=None,
        choices=ERROR_LEVELS,
        help="how bad inputs are judged (SPEC §9.1): 'message' = the reference's exception class and "
        "exact message; 'kind' = an error of the spec's kind (ValueError). Default: 'message' for the "
        "built-in backends, 'kind' for any other",
    )
    group.addoption("--peer-verdict-json", default=None, metavar="PATH", help="write the verdict as JSON")
    group.addoption("--peer-verdict-md", default=None, metavar="PATH", help="write the verdict as Markdown")


@pytest.hookimpl(tryfirst=True)  # before Hypothesis's own plugin loads the --hypothesis-profile named
def pytest_configure(config):
    if not _requested(config):
        return
    register_profiles()
    if not config.getoption("--hypothesis-profile", default=None):
        from hypothesis import settings

        settings.load_profile("peer-ci" if os.environ.get("CI") else "peer-dev")
    _load_torch_before_tensorflow()
    from .verdict import Verdict

    config.pluginmanager.register(_Session(config), "peer-conformance-session")
    config.pluginmanager.register(Verdict(config), "peer-conformance-verdict")


def _load_torch_before_tensorflow():
    """The checkpoint tests load every installed backend into one process; where both torch and
    TensorFlow are installed, torch has to be imported first or their native libraries clash."""
    import importlib.util

    if importlib.util.find_spec("torch") and importlib.util.find_spec("tensorflow"):
        import torch  # noqa: F401  (imported for its side effect: torch's native libraries load first)


def _requested(config) -> list[str]:
    name = config.getoption("--peer-backend") or os.environ.get("PEER_BACKEND")
    if not name:
        return []
    import peer_backends

    if name == "all":
        return peer_backends.available()
    return [name]


def error_level(config, name: str) -> str:
    """The --peer-errors level for backend ``name`` (default: 'message' for a built-in backend)."""
    chosen = config.getoption("--peer-errors")
    if chosen:
        return chosen
    import peer_backends._registry as registry

    return "message" if registry.canonical(name) in registry.BACKENDS else "kind"


def _is_conformance(item_or_module) -> bool:
    return getattr(item_or_module, "__name__", "").startswith(_PACKAGE + ".") or (
        _PACKAGE in Path(str(getattr(item_or_module, "path", ""))).parts
    )


def conformance_backend(item) -> str | None:
    """The backend name a conformance test item runs against (None for any other item)."""
    callspec = getattr(item, "callspec", None)
    if callspec is None or "backend" not in callspec.params or not _is_conformance(item):
        return None
    return callspec.params["backend"]


def short_id(item) -> str:
    """A conformance test's name with its parameters other than the backend: ``test_x[float32]``."""
    backend = str(item.callspec.params["backend"])
    inner = item.name[len(item.originalname) + 1 : -1]  # the ids pytest gave the parameters, "-"-joined
    ids = inner.split("-")
    for start in range(len(ids)):  # drop the backend's id (a module path may hold no "-", a name might)
        span = len(backend.split("-"))
        if "-".join(ids[start : start + span]) == backend:
            ids = ids[:start] + ids[start + span :]
            break
    return item.originalname + (f"[{'-'.join(ids)}]" if ids else "")


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
    from peer_backends import options
    from peer_backends.contract import ATTRIBUTES

    be = peer_backends.get(request.param)
    missing = [attr for attr in ATTRIBUTES if not hasattr(be, attr)]
    if missing:
        pytest.fail(f"backend {request.param!r} lacks contract attributes {missing}", pytrace=False)
    options.supported(be)  # an unknown option fails the run here, with its name
    from .helpers import prepare, with_implementation

    implementation = request.config.getoption("--peer-implementation")
    if implementation is not None:
        be = with_implementation(be, implementation)
    return prepare(be)


@pytest.fixture
def error_kind(request, backend) -> str:
    """The level bad inputs are judged at for this backend (see --peer-errors)."""
    return error_level(request.config, request.node.callspec.params["backend"])


def pytest_report_header(config):
    names = _requested(config)
    if not names:
        return None
    lines = []
    from hypothesis import settings

    import peer_backends
    from peer_backends import options

    for name in names:
        try:
            be = peer_backends.get(name)
            caps = ",".join(sorted(be.capabilities))
            lines.append(f"peer backend: {be.name} (framework {be.version}; capabilities {caps})")
            table = options.supported(be)
            lacking = {k: tuple(v for v in options.OPTIONS[k] if v not in table[k]) for k in options.OPTIONS}
            if any(lacking.values()):
                lines.append(
                    "peer options not supported: "
                    + ", ".join(f"{k}={v!r}" for k, values in lacking.items() for v in values)
                )
            lines.append(f"peer errors judged by: {error_level(config, name)}")
        except Exception as err:  # report, the fixture will fail the tests with the same error
            lines.append(f"peer backend: {name} (unavailable: {err})")
    implementation = config.getoption("--peer-implementation")
    if implementation is not None:
        lines.append(f"peer implementation: {implementation}")
    lines.append(f"hypothesis profile: {settings.get_current_profile_name()}")
    return lines


def _load_divergences(config) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    path = config.getoption("--peer-divergences")
    if path:
        return tomllib.loads(Path(path).read_text())
    return tomllib.loads(resources.files(_PACKAGE).joinpath("divergences.toml").read_text())


class _Session:
    """Hooks active only in a run that names a backend."""

    def __init__(self, config):
        self.config = config

    def pytest_collection_modifyitems(self, config, items):
        """Apply known divergences: ``[backend] xfail/skip = [{test = "name", reason = "..."}]``, where
        the name is a test's (every parametrization) or one parametrization's as the verdict shows it
        (``test_x[float32]``). An xfail is strict: a divergence that is gone fails the run."""
        import peer_backends._registry as registry

        table = _load_divergences(config)
        for item in items:
            name = conformance_backend(item)
            if name is None:
                continue
            entries = table.get(registry.canonical(name), {})
            base = item.originalname or item.name
            for kind in ("skip", "xfail"):
                for entry in entries.get(kind, []):
                    if entry["test"] in (base, item.name, short_id(item)):
                        marker = pytest.mark.skip if kind == "skip" else pytest.mark.xfail
                        item.add_marker(marker(reason=entry["reason"], **({"strict": True} if kind == "xfail" else {})))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item):
        """Run a conformance test with its backend's declared options in force (strategies.declared);
        record the option values its draws had to leave out."""
        if conformance_backend(item) is None or "backend" not in item.funcargs:
            return (yield)
        from peer_backends import options

        from .strategies import declared

        with declared(options.supported(item.funcargs["backend"])) as left_out:
            try:
                return (yield)
            finally:
                for option, value in sorted(left_out, key=repr):
                    item.user_properties.append(("peer_left_out", options.describe({option: value})))

    def pytest_runtest_teardown(self, item, nextitem):
        """At the end of each conformance module, let the backend drop its compiled specialisations."""
        name = conformance_backend(item)
        if name is None or (nextitem is not None and nextitem.module is item.module):
            return
        import peer_backends

        clear = getattr(peer_backends.get(name), "clear_caches", None)
        if clear is not None:
            clear()
