"""Golden vectors (spec/vectors): the backend reproduces the stored reference results."""

import numpy as np
import pytest

import peer_spec
from peer_ref import TOLERANCES, PEERConfig

from .helpers import assert_close, assert_equal, assert_tree_close, needs

VECTORS = peer_spec.vector_paths()


def test_vectors_are_installed():
    assert len(VECTORS) >= 10, f"found {len(VECTORS)} golden vectors, but expected the shipped set"


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.stem)
def test_backend_reproduces_vector(backend, path):
    vector = peer_spec.load_vector(path)
    dtype = vector.x.dtype.name
    needs(backend, dtype)
    cfg = PEERConfig.from_dict(vector.config)
    tol = TOLERANCES[dtype]
    convert = backend.from_numpy
    mask = None if vector.mask is None else convert(vector.mask)
    args = (cfg, convert(vector.params), convert(vector.state), convert(vector.x))
    y, new_state, aux = backend.to_numpy(backend.apply(*args, training=vector.training, mask=mask))
    context = f"vector {vector.name}"
    assert_equal(
        np.asarray(aux["indices"]).astype(np.int64), vector.aux["indices"], what="aux['indices']", context=context
    )
    assert_close(y, vector.y, rtol=tol.rtol, atol=tol.atol, what="y", context=context)
    assert_tree_close(new_state, vector.new_state, rtol=tol.rtol, atol=tol.atol, what="new_state", context=context)
    for key in ("scores", "weights"):
        assert_close(aux[key], vector.aux[key], rtol=tol.rtol, atol=tol.atol, what=f"aux[{key!r}]", context=context)
    if "grad" in backend.capabilities:
        grads, dx = backend.to_numpy(backend.vjp(*args, convert(vector.dy), training=vector.training, mask=mask))
        assert_tree_close(grads, vector.grads, rtol=tol.grad_rtol, atol=tol.grad_atol, what="grads", context=context)
        assert_close(dx, vector.dx, rtol=tol.grad_rtol, atol=tol.grad_atol, what="dx", context=context)
