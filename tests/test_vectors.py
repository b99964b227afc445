"""peer_ref reproduces the golden vectors in spec/vectors, and the vectors cover every option."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import peer_ref

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"
FILES = sorted(VECTORS.glob("*.npz"))
# Float64 across machines differs only by BLAS rounding. A float32 product rounds at ~6e-8, so
# the float32 files are compared at a few float32 ulps instead.
TOLERANCE = {"float64": 1e-12, "float32": 1e-6}


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def _tree(data: dict, prefix: str) -> dict[str, np.ndarray]:
    return {key[len(prefix) + 1 :]: value for key, value in data.items() if key.startswith(prefix + "/")}


def test_vectors_exist():
    assert len(FILES) >= 10, f"found {len(FILES)} vector files in {VECTORS}, but expected about ten"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_reference_reproduces_vector(path):
    data = _load(path)
    assert str(data["format"]) == "peer-vectors/1"
    cfg = peer_ref.PEERConfig.from_dict(json.loads(str(data["config"])))
    training = bool(data["training"])
    params, state = _tree(data, "params"), _tree(data, "state")
    assert sorted(params) == sorted(cfg.param_shapes()) and sorted(state) == sorted(cfg.state_shapes())
    mask = data.get("mask")
    tol = TOLERANCE[data["x"].dtype.name]

    y, new_state, aux = peer_ref.forward(cfg, params, state, data["x"], training, mask)
    grads, dx = peer_ref.vjp(cfg, params, state, data["x"], data["dy"], training, mask)
    np.testing.assert_array_equal(aux["indices"], data["aux/indices"], err_msg=f"{path.stem}: aux/indices")
    assert data["aux/indices"].dtype == np.int64
    got = {"y": y, "dx": dx, "aux/scores": aux["scores"], "aux/weights": aux["weights"]}
    got.update({f"new_state/{k}": v for k, v in new_state.items()})
    got.update({f"grads/{k}": v for k, v in grads.items()})
    stored = {k for k in data if k.split("/")[0] in ("y", "dx", "aux", "new_state", "grads")} - {"aux/indices"}
    assert set(got) == stored, f"{path.stem}: computed {sorted(got)}, stored {sorted(stored)}"
    for key, value in got.items():
        assert value.dtype == data[key].dtype and value.shape == data[key].shape, key
        np.testing.assert_allclose(value, data[key], rtol=tol, atol=tol, err_msg=f"{path.stem}: {key}")


def test_vectors_cover_every_option():
    seen: dict[str, set] = {}

    def note(option, value):
        seen.setdefault(option, set()).add(value)

    for path in FILES:
        data = _load(path)
        cfg = peer_ref.PEERConfig.from_dict(json.loads(str(data["config"])))
        for option in ("activation", "score", "query_norm", "shared_keys", "query_bias", "expert_bias"):
            note(option, getattr(cfg, option))
        note("d_out != d_model", cfg.d_out != cfg.d_model)
        note("training", bool(data["training"]))
        note("mask", "mask" in data)
        note("lead rank", min(data["x"].ndim - 1, 2))
        note("zero tokens", data["x"].size == 0)
        note("dtype", data["x"].dtype.name)
        note("heads > 1", cfg.heads > 1)
        note("topk > 1", cfg.topk > 1)
        if "mask" in data:
            note("training with mask", bool(data["training"]))
        indices = data["aux/indices"]
        scores = data["aux/scores"]
        note("exact tie in selection", bool(np.any(np.diff(scores, axis=-1) == 0)) if indices.size else False)
    want = {
        "activation": set(peer_ref.ACTIVATIONS),
        "score": set(peer_ref.SCORES),
        "query_norm": set(peer_ref.QUERY_NORMS),
        "shared_keys": {True, False},
        "query_bias": {True, False},
        "expert_bias": {True, False},
        "d_out != d_model": {True, False},
        "training": {True, False},
        "mask": {True, False},
        "lead rank": {0, 1, 2},
        "zero tokens": {True, False},
        "dtype": {"float64", "float32"},
        "heads > 1": {True, False},
        "topk > 1": {True, False},
        "training with mask": {True},
        "exact tie in selection": {True, False},
    }
    for option, values in want.items():
        missing = values - seen.get(option, set())
        assert not missing, f"no vector has {option} = {sorted(missing, key=str)}"


def test_readme_documents_every_case():
    readme = (VECTORS / "README.md").read_text()
    for path in FILES:
        assert f"`{path.stem}`" in readme, f"spec/vectors/README.md does not describe {path.stem}"
