"""peer_backends — one API over every PEER implementation.

    import peer_backends
    peer_backends.available()          # installed backends; imports no framework
    be = peer_backends.get("torch")    # default: $PEER_BACKEND, else "numpy"
    params, state = be.init(cfg, seed=0)
    y, state, aux = be.apply(cfg, params, state, x, training=False, mask=None, routing=None)
    grads, dx = be.vjp(cfg, params, state, x, dy)
    layer = peer_backends.layer(cfg, backend="torch")
    peer_backends.save(path, cfg, params, state)
    cfg, params, state = peer_backends.load(path, backend="jax")

Frameworks are imported lazily — only when a backend is asked for — because they may be
missing, heavy or broken; importing this package imports none of them. The contract each
backend implements is documented in ``peer_backends.contract``.
"""

from ._registry import ALIASES, BACKENDS, ENV_VAR, available, get
from .checkpoint import load, save


def layer(cfg, backend: str | None = None, **kwargs):
    """The idiomatic layer of ``backend`` (nn.Module, Flax module, Keras layer, ...)."""
    return get(backend).layer(cfg, **kwargs)


__all__ = ["ALIASES", "BACKENDS", "ENV_VAR", "available", "get", "layer", "load", "save"]
