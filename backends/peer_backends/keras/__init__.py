"""PEER as a Keras 3 layer on every Keras backend: ``from peer_backends.keras import PEER``.

The layer computes with this project's backend for the framework Keras runs on
(``keras.backend.backend()``, set by ``KERAS_BACKEND``): ``peer_backends.tensorflow``,
``peer_backends.jax`` or ``peer_backends.torch``; that backend is imported when the first
layer is built. Importing this package imports keras (and with it the framework Keras runs on).
"""

from .layer import PEER

__all__ = ["PEER"]
