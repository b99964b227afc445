"""The reference (peer_ref) behind the backend contract: its own modules are the parts
(``peer_ref.forward_pass``, ``.routing``, ``.backward_pass``), validation included."""

import peer_ref
from peer_ref.errors import PEERConfigError

from .._implementation import choose

IMPLEMENTATIONS = ("numpy",)


def choose_implementation(implementation) -> str:
    """The implementation to run (only "numpy"); see peer_backends._implementation."""
    return choose("numpy", implementation, {"numpy": None}, list(IMPLEMENTATIONS))


def _no_jit(jit):
    if jit:
        raise PEERConfigError("jit=True, but backend 'numpy' has no compiled path (capabilities lack 'jit')")


def init(cfg, seed=0, dtype=None):
    return peer_ref.init(cfg, seed=seed, dtype=dtype or "float64")


def apply(
    cfg, params, state, x, training=False, mask=None, routing=None, *, jit=None, compute_dtype=None, implementation=None
):
    _no_jit(jit)
    choose_implementation(implementation)
    return peer_ref.forward(
        cfg, params, state, x, training=training, mask=mask, routing=routing, compute_dtype=compute_dtype
    )


def vjp(
    cfg,
    params,
    state,
    x,
    dy,
    training=False,
    mask=None,
    routing=None,
    *,
    jit=None,
    compute_dtype=None,
    implementation=None,
    sparse=False,
):
    _no_jit(jit)
    choose_implementation(implementation)
    return peer_ref.vjp(
        cfg,
        params,
        state,
        x,
        dy,
        training=training,
        mask=mask,
        routing=routing,
        compute_dtype=compute_dtype,
        sparse=sparse,
    )
