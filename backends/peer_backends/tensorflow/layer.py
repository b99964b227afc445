"""The TensorFlow backend's layer is the Keras 3 layer, ``peer_backends.keras.PEER``: under
``KERAS_BACKEND=tensorflow`` (Keras's default) it computes with this backend's traceable
forward; under the other Keras backends with theirs."""

from ..keras.layer import PEER

__all__ = ["PEER"]
