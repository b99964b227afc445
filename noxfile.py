"""Sessions: `nox -s lint docs tests kernels` runs everything (the README's test command, also nox's
default): `lint` ruff, `docs` the documentation site, `tests` the reference, every backend and
the harnesses, `kernels` the fused GPU kernels interpreted on the CPU;
`ref`, `torch`, `jax`, `tensorflow` one backend each;
`verdict` writes PEER-pytorch's conformance verdict into docs/conformance;
`bench` runs the benchmark harness (pass flags after `--`, e.g. `nox -s bench -- --preset paper`);
`train` runs the trainer (`nox -s train -- all --quick`); `docs` builds the documentation site
(`mkdocs build --strict`, into site/); `lint` runs ruff (check and format check).

Each session installs the project and only what it needs into its own virtual environment, with
the exact releases CI tests from constraints/ci.txt (pyproject.toml's extras are ranges; the pin
of torch 2.13.0 there selects its CPU build).
"""

from pathlib import Path

import nox

nox.options.sessions = ["lint", "docs", "tests", "kernels"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
# The Hypothesis profile: peer-ci (80 examples per core property, derandomized) unless told otherwise.
PROFILE = ["--hypothesis-profile", "peer-ci"]
PYTEST = ["-p", "no:cacheprovider", "-ra"]
# The exact releases CI tests (pip constraints: they pin what the extras ask for, and add nothing).
CONSTRAINTS = ["-c", "constraints/ci.txt"]


def _install(session, extras: str = "", editable: bool = False) -> None:
    target = f".[{','.join(filter(None, [extras, 'test']))}]"
    session.install(*CONSTRAINTS, *(["-e"] if editable else []), target)


# One process per conformance module: compiled backends (XLA) keep every executable they
# build, and one process holding a whole suite's worth of them runs out of memory mappings.
MODULES = sorted(p.stem for p in Path("conformance/peer_conformance").glob("test_*.py"))


def _conformance(backends: list[str], *extra: str) -> list[list[str]]:
    """One pytest command per (backend, conformance module)."""
    return [
        ["pytest", *PYTEST, *PROFILE, "-q", "--pyargs", f"peer_conformance.{module}", "--peer-backend", backend, *extra]
        for backend in backends
        for module in MODULES
    ]


def _together(session, commands: list, jobs: int | None = None) -> None:
    """Run independent pytest processes ``jobs`` at a time (default: one per CPU core; the
    ``PEER_CI_JOBS`` environment variable overrides), in the order given (longest first keeps
    the cores busy to the end). ``commands`` holds argument lists, or (arguments, env) pairs.
    Each process's output is printed whole when it ends; every failure is listed, then the
    session fails. The processes share nothing but the machine: each framework, device setup
    and kernel interpreter keeps to a process of its own, as when they ran one after another."""
    import concurrent.futures
    import os

    jobs = jobs or int(os.environ.get("PEER_CI_JOBS", 0)) or os.cpu_count() or 1
    failed = []

    def run(command):
        args, env = command if isinstance(command[0], list) else (command, None)
        try:
            output = session.run(*args, env=env, silent=True)
        except nox.command.CommandFailed:  # nox has printed its output
            failed.append(" ".join(args))
        else:
            print(f"$ {' '.join(args)}\n{output}", flush=True)

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        list(pool.map(run, commands))
    if failed:
        session.error("failed:\n" + "\n".join(failed))


# The first public verdict: PEER-pytorch through its adapter, every module in one process, its known
# divergences as strict xfails (a verdict that changes fails the run); the `verdict` session writes it
# to docs/conformance/.
PEER_PYTORCH = [
    "-q",
    "--hypothesis-profile",
    "peer-dev",
    "--hypothesis-seed",
    "0",
    "--pyargs",
    "peer_conformance",
    "--peer-backend",
    "peer_conformance.adapters.peer_pytorch",
    "--peer-divergences",
    "conformance/peer_conformance/adapters/peer_pytorch.toml",
]
VERDICT = "docs/conformance/peer-pytorch-verdict"


@nox.session(python=PYTHON)
def tests(session):
    """The whole suite: reference, packaging, every backend's own tests and conformance, bench smoke."""
    _install(session, "all")
    # Each framework's own tests in a process of its own (TensorFlow and torch loaded together
    # must import torch first; separate processes need no such care).
    # The sharded-table tests start their own device setups (gloo processes, 4 XLA host devices);
    # the trainer's tests load torch and JAX together.
    own = [f"tests/test_{name}_backend.py" for name in ("torch", "jax", "tensorflow")]
    own += [f"tests/test_{name}_parallel.py" for name in ("torch", "jax")] + ["tests/test_train.py"]
    keras_layer = "tests/test_keras_layer.py"  # once per Keras backend: Keras picks it at import
    # The kernels session's:
    kernel_tests = [f"--ignore=tests/test_{name}.py" for name in ("torch_kernels", "jax_kernels", "kernels_compile")]
    rest = ["tests", *(f"--ignore={path}" for path in [*own, keras_layer]), *kernel_tests]
    pytest = ["pytest", *PYTEST, *PROFILE]
    # Longest first: the compiled backends' conformance modules (a program compiled per shape).
    _together(
        session,
        [
            [*pytest, *rest, *session.posargs],
            *_conformance(["tensorflow", "jax"], *session.posargs),
            *([*pytest, path, *session.posargs] for path in own),
            *(
                ([*pytest, keras_layer, *session.posargs], {"KERAS_BACKEND": keras_backend})
                for keras_backend in ("tensorflow", "jax", "torch")
            ),
            *_conformance(["torch", "numpy"], *session.posargs),
            ["pytest", *PYTEST, *PEER_PYTORCH, *session.posargs],
        ],
    )


@nox.session(python=PYTHON)
def verdict(session):
    """PEER-pytorch's conformance verdict, written to docs/conformance/peer-pytorch-verdict.{json,md}."""
    _install(session, "all")
    session.run(
        "pytest",
        *PYTEST,
        *PEER_PYTORCH,
        "--peer-verdict-json",
        f"{VERDICT}.json",
        "--peer-verdict-md",
        f"{VERDICT}.md",
        *session.posargs,
    )


# The kernel paths under their interpreters (Triton: TRITON_INTERPRET=1 on CPU tensors; Pallas:
# interpret=True off GPUs), which run every program instance in Python: the conformance modules
# that exercise the expert stage, with the small "peer-kernels" Hypothesis profile.
KERNEL_MODULES = [
    "test_forward",
    "test_gradients",
    "test_mask",
    "test_routing",
    "test_shapes",
    "test_sparse_gradients",
    "test_vectors",
]
KERNEL_PATHS = {"torch": "triton", "jax": "pallas"}


@nox.session(python=PYTHON)
def kernels(session):
    """The fused GPU kernels (torch: Triton, JAX: Pallas): compiled for an sm_90 GPU ahead of time
    (no GPU needed), then in interpreter mode their own tests and the conformance modules above
    against implementation="triton" / "pallas"."""
    _install(session, "torch,jax,kernels")
    session.run("pytest", *PYTEST, "tests/test_kernels_compile.py", *session.posargs, env={"TRITON_INTERPRET": "0"})
    env = {"TRITON_INTERPRET": "1"}
    conformance = [
        [
            "pytest",
            *PYTEST,
            "--hypothesis-profile",
            "peer-kernels",
            "-q",
            "--pyargs",
            f"peer_conformance.{module}",
            "--peer-backend",
            backend,
            "--peer-implementation",
            implementation,
            *session.posargs,
        ]
        for backend, implementation in KERNEL_PATHS.items()
        for module in KERNEL_MODULES
    ]
    own = [["pytest", *PYTEST, f"tests/test_{name}_kernels.py", *session.posargs] for name in ("torch", "jax")]
    _together(session, [(command, env) for command in own + conformance])


@nox.session(python=PYTHON)
def ref(session):
    """NumPy only: the reference, its golden vectors, and the suite's own meta-tests."""
    _install(session, editable=True)
    session.run(
        "pytest",
        *PYTEST,
        *PROFILE,
        "tests/test_ref_config.py",
        "tests/test_ref_checks.py",
        "tests/test_ref_routing.py",
        "tests/test_ref_backward.py",
        "tests/test_ref_query_norm.py",
        "tests/test_ref_invariants.py",
        "tests/test_ref_init.py",
        "tests/test_ref_metrics.py",
        "tests/test_vectors.py",
        "tests/test_api.py",
        "tests/test_conformance_meta.py",
        "tests/test_conformance_helpers.py",
    )
    _together(session, _conformance(["numpy"]))


def _one_backend(session, backend: str) -> None:
    """One framework alone: install only its extra, run its own tests and the conformance suite."""
    _install(session, backend)
    session.run("pytest", *PYTEST, *PROFILE, f"tests/test_{backend}_backend.py")
    if Path(f"tests/test_{backend}_parallel.py").exists():
        session.run("pytest", *PYTEST, *PROFILE, f"tests/test_{backend}_parallel.py")
    if backend == "tensorflow":  # the Keras layer on Keras's TensorFlow backend
        session.run("pytest", *PYTEST, *PROFILE, "tests/test_keras_layer.py", env={"KERAS_BACKEND": "tensorflow"})
    _together(session, _conformance([backend]))


@nox.session(python=PYTHON, name="torch")
def torch_session(session):
    _one_backend(session, "torch")


@nox.session(python=PYTHON, name="jax")
def jax_session(session):
    _one_backend(session, "jax")


@nox.session(python=PYTHON, name="tensorflow")
def tensorflow_session(session):
    _one_backend(session, "tensorflow")


@nox.session(python=PYTHON)
def lint(session):
    """ruff: the linter and the formatter's check (configured in pyproject.toml [tool.ruff])."""
    session.install(*CONSTRAINTS, "ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def bench(session):
    """The benchmark on the embedded default preset (cpu); flags after `--` override it."""
    _install(session, "all")
    session.run("python", "-m", "peer_bench", *session.posargs)


@nox.session(python=PYTHON)
def train(session):
    """The trainer, `python -m peer_train` (default: every experiment into train/results)."""
    _install(session, "train,tensorflow")
    session.run("python", "-m", "peer_train", *(session.posargs or ["all", "--out", "train/results"]))


@nox.session(python=PYTHON)
def docs(session):
    """The documentation site, warnings as errors: `mkdocs build --strict` into site/ (no framework
    needed: the API reference is read from the sources, the result tables from the committed files)."""
    session.install(*CONSTRAINTS, ".[docs]")
    session.run("mkdocs", "build", "--strict", "--site-dir", "site", *session.posargs)
