"""The one backend API: lazy lookup, aliases, clear errors, and the checkpoint format's refusals."""

import json
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy

import peer_backends
import peer_ref
from peer_backends import _registry
from peer_ref import PEERCheckpointError, PEERConfig, PEERConfigError

CFG = PEERConfig(d_model=4, n_experts=9, heads=2, topk=2, d_key=4)


def test_importing_the_package_imports_no_framework():
    code = (
        "import sys, peer_backends\npeer_backends.available()\n"
        "loaded = [m for m in ('torch', 'jax', 'tensorflow', 'keras', 'flax') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_available_lists_numpy_and_only_installed_frameworks():
    names = peer_backends.available()
    assert names[0] == "numpy"
    assert set(names) <= set(_registry.BACKENDS)


@pytest.mark.parametrize("alias", ["numpy", "np", "ref", "reference", " NumPy "])
def test_aliases(alias):
    assert peer_backends.get(alias).name == "numpy"


def test_default_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("PEER_BACKEND", raising=False)
    assert peer_backends.get().name == "numpy"
    monkeypatch.setenv("PEER_BACKEND", "ref")
    assert peer_backends.get().name == "numpy"


def test_unknown_backend_names_the_choices():
    with pytest.raises(PEERConfigError, match=r"backend='mxnet', but expected one of \['jax', 'numpy'"):
        peer_backends.get("mxnet")


def test_missing_framework_names_the_extra(monkeypatch):
    real = _registry.importlib.util.find_spec
    monkeypatch.setattr(_registry.importlib.util, "find_spec", lambda name: None if name == "torch" else real(name))
    with pytest.raises(ImportError, match=r'pip install "peer-layer\[torch\]"'):
        peer_backends.get("pytorch")
    assert "torch" not in peer_backends.available()


def test_third_party_backend_by_import_path():
    assert peer_backends.get("peer_backends.numpy").name == "numpy"
    assert peer_backends.get("peer_backends:numpy").name == "numpy"
    with pytest.raises(PEERConfigError, match="has no attribute 'nope'"):
        peer_backends.get("peer_backends:nope")
    with pytest.raises(PEERConfigError, match="module not found"):
        peer_backends.get("no_such_package.backend")


def test_layer_dispatches_to_the_backend():
    layer = peer_backends.layer(CFG, backend="numpy", seed=1)
    y = layer(np.ones((3, 4)))
    assert y.shape == (3, 4) and set(layer.params) == set(CFG.param_shapes())
    assert type(layer) is peer_backends.get("numpy").PEER
    _, aux = layer(np.ones((3, 4)), return_aux=True)
    assert aux["indices"].shape == (3, CFG.heads, CFG.topk)
    assert "experts.down: (9, 4) float64" in repr(layer) and repr(CFG) in repr(layer)


def test_layer_needs_the_framework_named(monkeypatch):
    monkeypatch.setenv("PEER_BACKEND", "numpy")  # the functional API's default is not the layer's
    with pytest.raises(
        PEERConfigError,
        match=r"backend=None, but expected the framework the layer is for: one of "
        r"\['jax', 'keras', 'numpy', 'tensorflow', 'torch'\]",
    ):
        peer_backends.layer(CFG)


def test_keras_layer_without_keras_names_the_extra(monkeypatch):
    real = peer_backends.importlib.util.find_spec
    monkeypatch.setattr(peer_backends.importlib.util, "find_spec", lambda name: None if name == "keras" else real(name))
    with pytest.raises(
        ImportError, match=r"backend='keras' needs the 'keras' package.*pip install 'peer-layer\[tensorflow\]'"
    ):
        peer_backends.layer(CFG, backend="keras")


# --- checkpoints -------------------------------------------------------------------------------


def _write(path, tensors, metadata):
    safetensors.numpy.save_file(tensors, str(path), metadata=metadata)


def _good(tmp_path):
    params, state = peer_ref.init(CFG, seed=0)
    meta = {"format": "peer", "format_version": "1", "config": json.dumps(CFG.to_dict())}
    return params, state, meta


def test_save_refuses_params_that_do_not_fit(tmp_path):
    params, state, _ = _good(tmp_path)
    params["experts.up"] = np.zeros((9, 5))
    with pytest.raises(peer_ref.PEERInputError, match=r"experts\.up"):
        peer_backends.save(tmp_path / "x.safetensors", CFG, params, state)


@pytest.mark.parametrize(
    "case, match",
    [
        ("no_metadata", "format=None"),
        ("other_version", "format_version='2'"),
        ("bad_config", "config is invalid"),
        ("extra_tensor", "does not define"),
        ("missing_tensor", r"missing=\['experts.bias'\]"),
        ("wrong_dtype", "dtype=float64"),
        ("integer_tensor", "dtype I32"),
    ],
)
def test_load_refuses_a_checkpoint_that_does_not_fit(tmp_path, case, match):
    params, state, meta = _good(tmp_path)
    tensors = {**params, **state}
    if case == "no_metadata":
        meta = {}
    elif case == "other_version":
        meta["format_version"] = "2"
    elif case == "bad_config":
        meta["config"] = json.dumps({**CFG.to_dict(), "topk": 7})
    elif case == "extra_tensor":
        tensors["experts.gate"] = np.zeros(3)
    elif case == "missing_tensor":
        del tensors["experts.bias"]
    elif case == "wrong_dtype":
        tensors["keys.left"] = tensors["keys.left"].astype(np.float32)
        tensors = {k: v.astype(np.float32) if k != "keys.left" else v.astype(np.float64) for k, v in tensors.items()}
    elif case == "integer_tensor":
        tensors["experts.bias"] = np.zeros(9, np.int32)
    path = tmp_path / "c.safetensors"
    _write(path, tensors, meta)
    with pytest.raises(PEERCheckpointError, match=match):
        peer_backends.load(path)


def test_checkpoint_from_before_expert_glu_loads_as_plain_experts(tmp_path):
    """A config JSON written before the field existed has no expert_glu: it means False (SPEC §12)."""
    params, state, meta = _good(tmp_path)
    old_config = CFG.to_dict()
    del old_config["expert_glu"]
    meta["config"] = json.dumps(old_config)
    path = tmp_path / "old.safetensors"
    _write(path, {**params, **state}, meta)
    cfg, loaded, _ = peer_backends.load(path)
    assert cfg.expert_glu is False and cfg == CFG
    assert set(loaded) == set(params) and "experts.gate" not in loaded


def test_glu_checkpoint_round_trips_and_needs_its_gate(tmp_path):
    glu = PEERConfig(d_model=4, n_experts=9, heads=2, topk=2, d_key=4, expert_glu=True)
    params, state = peer_ref.init(glu, seed=0)
    path = tmp_path / "glu.safetensors"
    peer_backends.save(path, glu, params, state)
    cfg, loaded, _ = peer_backends.load(path)
    assert cfg == glu and loaded["experts.gate"].tobytes() == params["experts.gate"].tobytes()
    meta = {"format": "peer", "format_version": "1", "config": json.dumps(glu.to_dict())}
    _write(path, {k: v for k, v in {**params, **state}.items() if k != "experts.gate"}, meta)
    with pytest.raises(PEERCheckpointError, match=r"missing=\['experts.gate'\]"):
        peer_backends.load(path)


def test_load_refuses_a_file_that_is_not_safetensors(tmp_path):
    path = tmp_path / "c.safetensors"
    path.write_bytes(b"\x80\x04pickle? no")
    with pytest.raises(PEERCheckpointError, match="not a readable safetensors file"):
        peer_backends.load(path)


def test_round_trip_keeps_bfloat16_bits(tmp_path):
    import ml_dtypes

    params, state = peer_ref.init(CFG, seed=0, dtype="float32")
    params = {k: v.astype(ml_dtypes.bfloat16) for k, v in params.items()}
    path = tmp_path / "bf16.safetensors"
    peer_backends.save(path, CFG, params, state)
    _, loaded, loaded_state = peer_backends.load(path)
    for name, value in params.items():
        assert loaded[name].dtype == value.dtype and loaded[name].tobytes() == value.tobytes()
    assert loaded_state["query_norm.var"].dtype == np.float32


def test_every_role_has_its_name(unresolved_roles):
    """peer_backends.contract.ROLES is true of this backend: one name per role in every backend."""
    assert unresolved_roles("numpy") == []
