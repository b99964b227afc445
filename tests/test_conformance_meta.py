"""The conformance suite can fail: each deliberately broken backend in mutants.py is caught.

Every mutant is run against the conformance module that owns the rule it breaks; the
suite must report a failure. The correct reference backend passes the same modules (it is
run by the main conformance sessions), so a failure here means a missed bug, not a broken suite.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent

CAUGHT_BY = {
    "bn_variance_swapped": "test_batchnorm",
    "running_stats_frozen": "test_batchnorm",
    "momentum_flipped": "test_batchnorm",
    "mask_ignored_in_statistics": "test_batchnorm",
    "tie_order_reversed": "test_routing",
    "softmax_missing": "test_forward",
    "gelu_approximated": "test_forward",
    "gate_activated": "test_forward",
    "bn_gradient_detached": "test_gradients",
    "key_gradient_missing": "test_gradients",
    "per_head_keys": "test_params",
    "silent_cast": "test_errors",
    "masked_output_multiplied": "test_mask",
}


def _run(backend: str, module: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    env.pop("CI", None)
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-q",
        "-x",
        "--no-header",
        "--hypothesis-profile",
        "dev",
        "--pyargs",
        f"peer_conformance.{module}",
        "--peer-backend",
        backend,
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("mutant", sorted(CAUGHT_BY))
def test_mutant_is_caught(mutant):
    result = _run(f"mutants:{mutant}", CAUGHT_BY[mutant])
    tail = result.stdout[-3000:] + result.stderr[-2000:]
    assert result.returncode == 1, (
        f"mutant {mutant!r} was not caught by {CAUGHT_BY[mutant]} (exit {result.returncode}):\n{tail}"
    )
    assert " failed" in result.stdout, tail


def test_every_mutant_is_listed():
    sys.path.insert(0, str(HERE))
    try:
        import mutants
    finally:
        sys.path.remove(str(HERE))
    defined = {name for name, value in vars(mutants).items() if getattr(value, "name", "").startswith("mutant-")}
    assert defined == set(CAUGHT_BY)
