"""SPEC §12 Checkpoints: safetensors round trips between this backend and every installed one."""

import json

import numpy as np
import pytest

import peer_backends
import peer_ref
from peer_ref import PEERConfig

from .helpers import needs, prepare

CFG = PEERConfig(d_model=6, n_experts=16, heads=2, topk=3, d_key=4, d_out=5, query_bias=True, expert_glu=True)


@pytest.mark.parametrize("target", peer_backends.available())
@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16", "float16"])
def test_round_trip_to_every_installed_backend(backend, target, dtype, tmp_path):
    needs(backend, dtype)
    other = prepare(peer_backends.get(target))
    if dtype not in other.capabilities:
        pytest.skip(f"target backend {target!r} does not declare capability {dtype!r}")
    params, state = backend.init(CFG, seed=1, dtype=dtype)
    path = tmp_path / "layer.safetensors"
    peer_backends.save(path, CFG, params, state)
    cfg, params2, state2 = peer_backends.load(path, backend=target)
    assert cfg == CFG
    before = backend.to_numpy({**params, **state})
    after = other.to_numpy({**params2, **state2})
    assert set(after) == set(before)
    for name in before:
        a, b = np.asarray(before[name]), np.asarray(after[name])
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{name}: {b.dtype}{b.shape}, but should be {a.dtype}{a.shape}"
        )
        assert a.tobytes() == b.tobytes(), f"{name} changed in the round trip {backend.name} -> {target}"
    # And back again, through the target's arrays.
    peer_backends.save(path, cfg, params2, state2)
    _, params3, _ = peer_backends.load(path, backend=backend.name)
    assert backend.to_numpy(params3)["experts.up"].tobytes() == np.asarray(before["experts.up"]).tobytes()


def test_checkpoint_that_does_not_fit_its_config_is_refused(backend, tmp_path):
    import safetensors.numpy

    params, state = peer_ref.init(CFG, seed=0, dtype="float32")
    params["experts.down"] = np.zeros((16, 7), np.float32)
    path = tmp_path / "bad.safetensors"
    meta = {"format": "peer", "format_version": "1", "config": json.dumps(CFG.to_dict())}
    safetensors.numpy.save_file({**params, **state}, str(path), metadata=meta)
    with pytest.raises(peer_ref.PEERCheckpointError, match=r"experts\.down"):
        peer_backends.load(path, backend=backend.name)
