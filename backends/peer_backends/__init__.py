"""peer_backends — one API over every PEER implementation.

    import peer_backends
    peer_backends.available()          # installed backends; imports no framework
    be = peer_backends.get("torch")    # default: $PEER_BACKEND, else "numpy"
    params, state = be.init(cfg, seed=0)
    y, state, aux = be.apply(cfg, params, state, x, training=False, mask=None, routing=None)
    grads, dx = be.vjp(cfg, params, state, x, dy)
    layer = peer_backends.layer(cfg, backend="torch")   # or "jax", "keras"; always named
    peer_backends.save(path, cfg, params, state)
    cfg, params, state = peer_backends.load(path, backend="jax")

Frameworks are imported lazily — only when a backend is asked for — because they may be
missing, heavy or broken; importing this package imports none of them. The contract each
backend implements is documented in ``peer_backends.contract``.
"""

import importlib.util

from peer_ref.errors import PEERConfigError

from ._registry import ALIASES, BACKENDS, ENV_VAR, available, get
from .checkpoint import load, save


def layer(cfg, backend: str | None = None, **kwargs):
    """The idiomatic layer of ``backend`` for ``cfg``: ``backend`` names the framework.

    Args:
      cfg: the PEERConfig.
      backend: "torch" (an ``nn.Module``: ``peer_backends.torch.PEER``), "jax" (a Flax NNX
        module: ``peer_backends.jax.PEER``), "keras" or "tensorflow" (a Keras 3 layer, on any
        Keras backend: ``peer_backends.keras.PEER``), "numpy" (the reference as a small
        stateful object: ``peer_backends.numpy.PEER``), an alias of one, or the import path
        of a third-party backend. Required: a layer lives in one framework's models.
      **kwargs: the layer class's own, e.g. ``seed``, ``dtype``, ``implementation``; torch:
        ``device``; JAX: ``rngs``, ``param_dtype``, ``use_running_average``; Keras: ``name``,
        ``trainable``. See each class's docstring.

    Raises:
      PEERConfigError: no ``backend``, or an unknown one.
      ImportError: the framework of ``backend`` is not installed.
    """
    if backend is None:
        raise PEERConfigError(
            f"backend=None, but expected the framework the layer is for: one of {sorted([*BACKENDS, 'keras'])} "
            "(e.g. peer_backends.layer(cfg, backend='torch'))"
        )
    if isinstance(backend, str) and backend.strip().lower() == "keras":
        if importlib.util.find_spec("keras") is None:
            raise ImportError(
                f"backend={backend!r} needs the 'keras' package, which is not installed; install it "
                f"with: pip install 'peer-layer[{BACKENDS['tensorflow'].extra}]'"
            )
        from .keras import PEER

        return PEER(cfg, **kwargs)
    return get(backend).layer(cfg, **kwargs)


__all__ = ["ALIASES", "BACKENDS", "ENV_VAR", "available", "get", "layer", "load", "save"]
