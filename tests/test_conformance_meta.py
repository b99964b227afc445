"""The conformance suite can fail: each deliberately broken backend in mutants.py is caught.

Every mutant is run against the conformance module that owns the rule it breaks; the
suite must report a failure. The correct reference backend passes the same modules (it is
run by the main conformance sessions), so a failure here means a missed bug, not a broken suite.
And the suite is fair: a mutant whose bug lies only in an option its backend declares unsupported
passes, with that option reported as not supported in the verdict.
"""

import json
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
    "sparse_rows_of_masked_tokens": "test_sparse_gradients",
    "sparse_tables_dense": "test_sparse_gradients",
}


# Restricted mutants (mutants._restricted): the module that catches the bug, and the option the
# backend declares unsupported, as the verdict names it.
NOT_BLAMED = {
    "gate_activated_without_glu": ("test_forward", "expert_glu=True"),
    "softmax_missing_without_softmax": ("test_forward", "score='softmax'"),
    "bn_variance_swapped_without_batch_norm": ("test_batchnorm", "query_norm='batch'"),
    "per_head_keys_without_shared_keys": ("test_params", "shared_keys=True"),
    "masked_output_multiplied_without_mask": ("test_mask", "mask=True"),
}


def _run(backend: str, module: str, *extra: str) -> subprocess.CompletedProcess:
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
        "peer-dev",
        "--pyargs",
        f"peer_conformance.{module}",
        "--peer-backend",
        backend,
        *extra,
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


@pytest.mark.parametrize("mutant", sorted(NOT_BLAMED))
def test_bug_in_an_unsupported_option_is_not_blamed(mutant, tmp_path):
    module, option = NOT_BLAMED[mutant]
    verdict_path = tmp_path / "verdict.json"
    result = _run(f"mutants:{mutant}", module, "--peer-verdict-json", str(verdict_path))
    tail = result.stdout[-3000:] + result.stderr[-2000:]
    assert result.returncode == 0, f"mutant {mutant!r} was blamed by {module} (exit {result.returncode}):\n{tail}"
    (section,) = json.loads(verdict_path.read_text())[0]["sections"]
    reported = section["lacking"] + section["not_exercised"]
    assert option in reported, f"{option} is missing from the verdict's not supported options {section}"


def _defined(prefix: str) -> set[str]:
    sys.path.insert(0, str(HERE))
    try:
        import mutants
    finally:
        sys.path.remove(str(HERE))
    return {name for name, value in vars(mutants).items() if getattr(value, "name", "").startswith(prefix)}


def test_every_mutant_is_listed():
    assert _defined("mutant-") == set(CAUGHT_BY)
    assert _defined("restricted-") == set(NOT_BLAMED)
