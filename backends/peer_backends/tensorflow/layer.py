import keras
import tensorflow as tf

from peer_ref import PEERConfig, checks

from .core import from_numpy, meta
from .peer import choose_implementation, float32_means_float32, forward, init


@keras.saving.register_keras_serializable(package="peer")
class PEER(keras.layers.Layer):
    """PEER as a Keras 3 layer (TensorFlow backend): ``PEER(cfg)(x, training=..., mask=...)``.

    Every weight is created with ``add_weight(name=<canonical name>)``, so
    ``variable.name`` is e.g. "experts.down" and ``variable.path`` is
    "<layer name>/experts.down". Trainable weights are ``cfg.param_shapes()``;
    the batch-norm statistics ("query_norm.mean", "query_norm.var") are
    non-trainable and updated by assignment in training calls.

    ``mask`` is PEER's token mask (bool, ``x.shape[:-1]``), which is also Keras's
    sequence mask layout: a mask propagated by an earlier layer (e.g.
    ``Embedding(mask_zero=True)``) excludes those tokens from the statistics and
    zeroes their output, and the layer passes it on unchanged.

    ``dtype`` is a Keras dtype policy, as for any Keras layer: a policy name ("float32",
    "float64", "bfloat16", "mixed_bfloat16", ...), a ``keras.DTypePolicy``, or None for the
    global policy (``keras.config.set_dtype_policy``). Weights are created in the policy's
    variable dtype; Keras casts float inputs to its compute dtype, and the output has the
    compute dtype. A mixed policy (float32 variables, bfloat16 compute) runs the functional
    API's mixed mode (``compute_dtype=``): float32 weights and statistics, expert rows read in
    bfloat16, y in bfloat16 (SPEC mixed precision). Initial values equal
    ``peer_backends.get("tensorflow").init(cfg, seed, variable_dtype)``.

    Freezing follows ``keras.layers.BatchNormalization``: with ``layer.trainable = False`` a
    call with ``training=True`` (what ``fit()`` makes) runs in inference mode, normalising
    with the running statistics and leaving them unchanged.

    Saving: the class is registered as "peer>PEER"; ``get_config()`` carries the PEERConfig
    (``cfg.to_dict()``), the seed and the dtype, so a model holding the layer round-trips
    through ``model.save("m.keras")`` / ``keras.models.load_model`` with its weights and
    statistics bit-exact.

    ``implementation``: the expert-stage kernels, None or "tensorflow" (the only one; see the
    functional API's ``implementation=``).
    """

    def __init__(self, cfg: PEERConfig, seed: int = 0, dtype=None, implementation=None, **kwargs):
        super().__init__(dtype=dtype, **kwargs)
        choose_implementation(implementation)
        self.cfg, self.seed, self.implementation = cfg, seed, implementation
        self.param_dtype = checks.check_dtype_name(self.dtype_policy.variable_dtype)
        compute = self.dtype_policy.compute_dtype
        # float32 variables with a bfloat16/float16 compute dtype: the mixed mode (SPEC §10.3).
        self.mixed_dtype = checks.check_compute_dtype(self.param_dtype, compute)
        self.supports_masking = True
        self.build((None, cfg.d_model))

    def build(self, input_shape=None):
        params, state = init(self.cfg, seed=self.seed, dtype=self.param_dtype)
        self._params = {name: self._add(name, value, trainable=True) for name, value in params.items()}
        self._state = {name: self._add(name, value, trainable=False) for name, value in state.items()}

    def _add(self, name, value, trainable):
        # autocast=False: the weights are read in their own dtype; the mixed mode rounds what it reads.
        return self.add_weight(shape=value.shape, dtype=value.dtype.name, trainable=trainable, name=name,
                               initializer=lambda shape, dtype: value, autocast=False)

    def call(self, x, training=None, mask=None, routing=None):
        # None: no Keras training context, so inference. A frozen layer runs in inference mode,
        # as keras.layers.BatchNormalization does ("training and self.trainable").
        cfg, training = self.cfg, bool(training) and self.trainable
        low = self.mixed_dtype
        float32_means_float32()
        optional = (None if v is None else meta(v) for v in (mask, routing))
        checks.check_call(cfg, self.param_dtype, meta(x), training, *optional, compute_dtype=low)
        flat = lambda t, tail: None if t is None else tf.reshape(t, (-1,) + tail)  # noqa: E731
        y, new_state, _ = forward(cfg, self._params, self._state, flat(x, (cfg.d_model,)), training,
                                  flat(mask, ()), flat(routing, (cfg.heads, cfg.topk)), low=low)
        if training:
            for name, variable in self._state.items():
                variable.assign(new_state[name])
        return tf.reshape(y, tf.concat([tf.shape(x)[:-1], [cfg.d_out]], 0))

    def compute_mask(self, inputs, mask=None):
        return mask

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.cfg.d_out,)

    def params_and_state(self):
        """Current ``(params, state)`` as tensors keyed by canonical names (the functional API's format)."""
        snapshot = lambda variables: {name: tf.convert_to_tensor(v) for name, v in variables.items()}  # noqa: E731
        return snapshot(self._params), snapshot(self._state)

    def load_params_and_state(self, params, state):
        """Assign ``(params, state)`` (tensors or NumPy arrays keyed by canonical names), validated first."""
        params, state = from_numpy(dict(params)), from_numpy(dict(state))
        dtype = checks.check_trees(self.cfg, params, state, meta)
        checks.check_dtype_name(dtype, (self.param_dtype,))
        for variables, values in ((self._params, params), (self._state, state)):
            for name, variable in variables.items():
                variable.assign(values[name])

    def get_config(self):
        # super()'s config carries the dtype policy, serialised as Keras does for its own layers.
        return {**super().get_config(), "cfg": self.cfg.to_dict(), "seed": self.seed,
                "implementation": self.implementation}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        return cls(PEERConfig.from_dict(config.pop("cfg")), **config)
