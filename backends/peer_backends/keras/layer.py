import importlib

import keras

import peer_ref
from peer_ref import PEERConfig, checks
from peer_ref.errors import PEERConfigError, PEERInputError

from .._implementation import check_known
from .._layer import check_seed, reference_tables

# The backend of this project that computes the layer on each Keras backend.
COMPUTE = {"tensorflow": "peer_backends.tensorflow", "jax": "peer_backends.jax", "torch": "peer_backends.torch"}
_GROUPS = ("query", "query_norm", "keys", "experts")


def _recomputation_pass() -> bool:
    """Whether a training call is one of the two passes of a recomputation that must leave the
    running statistics alone, so that one training step updates them once (SPEC §3.3).

    TensorFlow (``tf.recompute_grad``, which ``keras.remat`` is there): its forward runs with
    gradient recording stopped and its recomputation, in the backward pass, with recording on;
    a training call made while recording is stopped leaves the statistics to the
    recomputation. (A training call under ``tape.stop_recording()`` therefore updates nothing.)
    torch (``torch.utils.checkpoint``, ``keras.remat``): the recomputation runs inside a
    backward pass. JAX (``jax.checkpoint``, ``keras.remat``): Keras's stateless calls return
    the new statistics once, whatever is recomputed.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        from tensorflow.python import pywrap_tfe

        return bool(pywrap_tfe.TFE_Py_TapeSetIsStopped())
    if backend == "torch":
        import torch

        return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1
    return False


class Tables(keras.layers.Layer):
    """The weights of one canonical-name prefix (``query``, ``query_norm``, ``keys``,
    ``experts``), so that a weight's path is its canonical name with "/" for "." (Keras on
    torch refuses "." in a weight's path). Never called: ``PEER`` reads its weights."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.built = True


@keras.saving.register_keras_serializable(package="peer")
class PEER(keras.layers.Layer):
    """PEER as a Keras 3 layer: ``PEER(cfg)(x, training=..., mask=...)``, on every Keras
    backend (``KERAS_BACKEND=tensorflow``, ``jax`` or ``torch``), computing with this
    project's backend for that framework (``peer_backends.tensorflow``, ``.jax``, ``.torch``).

    Args:
      cfg: the PEERConfig.
      seed: None (default) draws the initial parameters through Keras's initializers, which
        follow Keras's seeding (``keras.utils.set_random_seed`` makes a model reproducible; two
        layers differ); an int gives the reference's tables ``peer_ref.init(cfg, seed)``
        rounded to the variable dtype, the same values in every framework (SPEC §8).
      dtype: a Keras dtype policy, as for any Keras layer: a policy name ("float32",
        "float64", "bfloat16", "mixed_bfloat16", ...), a ``keras.DTypePolicy``, or None for the
        global policy (``keras.config.set_dtype_policy``).
      implementation: the expert-stage kernels, a name of the computing backend's
        ``implementations`` or None for its best (see the functional API's ``implementation=``).
      sparse: False (default), or True for row-sparse gradients of the expert tables (SPEC
        §7.1), as ``keras.layers.Embedding``'s gradients are: under ``KERAS_BACKEND=tensorflow``
        the expert stage reads only the rows its valid tokens selected (``tf.gather``), so
        ``tf.GradientTape`` gives the tables' gradients as ``tf.IndexedSlices`` (sorted unique
        rows) and the optimizer receives them as such. Not under XLA (a train step compiled with
        ``jit_compile=True`` raises PEERConfigError: the row count is known only at run time).
        Under the jax and torch Keras backends gradients are dense and ``sparse=True`` raises
        PEERConfigError.
      **kwargs: ``keras.layers.Layer``'s (``name``, ``trainable``, ...).

    Weights: each canonical name is a weight of a sub-layer named after its first part, so
    ``variable.path`` is e.g. "<layer name>/experts/down". Trainable weights are
    ``cfg.param_shapes()``; the batch-norm statistics ("query_norm/mean", "query_norm/var")
    are non-trainable and updated by assignment in training calls, once per training step
    under recomputation too (``keras.remat``, ``tf.recompute_grad``, ``torch.utils.checkpoint``,
    ``jax.checkpoint``; SPEC §3.3, see ``_recomputation_pass``). ``params_and_state()`` and
    ``load_params_and_state()`` move the functional API's dicts (canonical names) in and out.

    ``mask`` is PEER's token mask (bool, ``x.shape[:-1]``, True keeps a token), which is also
    Keras's sequence mask layout: a mask propagated by an earlier layer (e.g.
    ``Embedding(mask_zero=True)``) excludes those tokens from the statistics and zeroes their
    output, and the layer passes it on unchanged.

    Dtypes: weights are created in the policy's variable dtype; Keras casts float inputs to its
    compute dtype, and the output has the compute dtype. A mixed policy (float32 variables,
    bfloat16 or float16 compute) runs the functional API's mixed mode (``compute_dtype=``):
    float32 weights and statistics, expert rows read in the low dtype, y in it (SPEC §10.3).

    Freezing follows ``keras.layers.BatchNormalization``: with ``layer.trainable = False`` a
    call with ``training=True`` (what ``fit()`` makes) runs in inference mode, normalising
    with the running statistics and leaving them unchanged.

    Saving: the class is registered as "peer>PEER"; ``get_config()`` carries the PEERConfig
    (``cfg.to_dict()``), the seed, the implementation and the dtype policy, so a model holding
    the layer round-trips through ``model.save("m.keras")`` / ``keras.models.load_model`` with
    its weights and statistics bit-exact.

    Raises:
      PEERConfigError: a Keras backend other than tensorflow, jax or torch; a seed that is not
        None or an int >= 0; an implementation the computing backend does not have;
        ``sparse=True`` on a Keras backend other than tensorflow.
      PEERInputError: ``sparse`` not a bool.
      PEERInputError: a dtype policy PEER does not support (SPEC §10).
    """

    def __init__(
        self, cfg: PEERConfig, seed: int | None = None, dtype=None, implementation=None, sparse=False, **kwargs
    ):
        super().__init__(dtype=dtype, **kwargs)
        framework = keras.backend.backend()
        if framework not in COMPUTE:
            raise PEERConfigError(
                f"keras.backend.backend()={framework!r}, but the PEER Keras layer runs on "
                f"{sorted(COMPUTE)} (set KERAS_BACKEND before importing keras)"
            )
        self.sparse = checks.check_flag("sparse", sparse)
        if self.sparse and framework != "tensorflow":
            raise PEERConfigError(
                f"sparse=True under KERAS_BACKEND={framework!r}, but row-sparse table gradients reach Keras "
                "optimizers only on the tensorflow backend (tf.IndexedSlices); under jax and torch the "
                "gradients are dense: use sparse=False"
            )
        self._compute = importlib.import_module(COMPUTE[framework])
        check_known(framework, implementation, self._compute.implementations)
        self.cfg, self.seed, self.implementation = cfg, check_seed(seed), implementation
        self.param_dtype = checks.check_dtype_name(self.dtype_policy.variable_dtype)
        # float32 variables with a bfloat16/float16 compute dtype: the mixed mode (SPEC §10.3).
        self.mixed_dtype = checks.check_compute_dtype(self.param_dtype, self.dtype_policy.compute_dtype)
        self.supports_masking = True
        for group in _GROUPS:
            setattr(self, group, Tables(name=group, dtype=self.dtype_policy))
        self.build((None, cfg.d_model))

    def build(self, input_shape=None):
        cfg, dtype = self.cfg, self.param_dtype
        stds, constants = peer_ref.init_std(cfg), peer_ref.init_constant(cfg)
        tables = {} if self.seed is None else reference_tables(cfg, self.seed, dtype)[0]

        def initializer(name):
            if name in tables:
                return lambda shape, dtype: keras.ops.cast(tables[name], dtype)
            if name in stds:
                return keras.initializers.RandomNormal(stddev=stds[name])
            return keras.initializers.Constant(constants[name])

        def add(name, shape, trainable):
            group, leaf = name.split(".")
            # autocast=False: weights are read in their own dtype; the mixed mode rounds what it reads.
            return getattr(self, group).add_weight(
                shape=shape,
                dtype=dtype if trainable else checks.state_dtype(dtype),
                trainable=trainable,
                name=leaf,
                initializer=initializer(name),
                autocast=False,
            )

        self._params = {name: add(name, shape, True) for name, shape in cfg.param_shapes().items()}
        self._state = {name: add(name, shape, False) for name, shape in cfg.state_shapes().items()}

    def call(self, x, training=None, mask=None, routing=None, return_aux=False):
        """y = PEER(x); in training calls of a trainable layer the statistics are updated.

        Args:
          x: (..., d_model), cast by Keras to the compute dtype of the layer's dtype policy.
          training: Keras's training flag (``fit`` passes True); None means inference.
          mask: optional bool (``x.shape[:-1]``); **True keeps a token**, False drops it (zero
            output, left out of the statistics; SPEC §5), as Keras's sequence masks do; the
            opposite of torch's ``key_padding_mask``.
          routing: optional int (..., heads, topk) of expert indices that replaces the
            product-key search (SPEC §4).
          return_aux: also return the routing of this call, as
            ``keras.layers.MultiHeadAttention`` returns its scores with
            ``return_attention_scores=True``.

        Returns:
          y, (..., d_out) in the compute dtype; with ``return_aux=True``, ``(y, aux)`` where
          aux holds "indices" (int), "scores" and "weights" (float), each (..., heads, topk).

        Raises:
          PEERInputError: x not floating, or x, mask or routing of the wrong shape or dtype
            (SPEC §9).
        """
        # None: no Keras training context, so inference. A frozen layer runs in inference mode,
        # as keras.layers.BatchNormalization does ("training and self.trainable").
        training = bool(training) and self.trainable
        x_dtype = keras.backend.standardize_dtype(x.dtype)
        if x_dtype != self.compute_dtype:
            raise PEERInputError(
                f"x.dtype={x_dtype}, but expected a floating x, which Keras casts to the layer's compute dtype "
                f"{self.compute_dtype} (dtype policy {self.dtype_policy.name!r}; choose it with dtype=, e.g. "
                "'mixed_bfloat16')"
            )
        params = {name: variable.value for name, variable in self._params.items()}
        state = {name: variable.value for name, variable in self._state.items()}
        y, new_state, aux = _apply(
            self._compute,
            self.cfg,
            params,
            state,
            x,
            training,
            mask,
            routing,
            self.mixed_dtype,
            self.implementation,
            self.sparse,
        )
        if training and not _recomputation_pass():
            for name, variable in self._state.items():
                variable.assign(new_state[name])
        return (y, aux) if return_aux else y

    def compute_mask(self, inputs, mask=None):
        return mask

    def compute_output_spec(self, x, training=None, mask=None, routing=None, return_aux=False):
        lead = tuple(x.shape[:-1])
        y = keras.KerasTensor(lead + (self.cfg.d_out,), dtype=self.compute_dtype)
        if not return_aux:
            return y
        routed = lead + (self.cfg.heads, self.cfg.topk)
        index = "int32" if self._compute.name == "jax" else "int64"
        score = "float32" if self.compute_dtype in ("bfloat16", "float16") else self.compute_dtype
        return y, {
            "indices": keras.KerasTensor(routed, dtype=index),
            "scores": keras.KerasTensor(routed, dtype=score),
            "weights": keras.KerasTensor(routed, dtype=score),
        }

    def params_and_state(self):
        """Copies of the current ``(params, state)``, the framework's tensors keyed by canonical
        names (the functional API's format)."""

        def snapshot(variables):
            return {name: keras.ops.copy(v.value) for name, v in variables.items()}

        return snapshot(self._params), snapshot(self._state)

    def load_params_and_state(self, params, state):
        """Assign ``(params, state)`` (tensors or NumPy arrays keyed by canonical names), validated first."""
        params, state = (
            self._compute.from_numpy(self._compute.to_numpy(dict(params))),
            self._compute.from_numpy(self._compute.to_numpy(dict(state))),
        )

        def meta(value):
            return tuple(value.shape), keras.backend.standardize_dtype(value.dtype)

        dtype = checks.check_trees(self.cfg, params, state, meta)
        checks.check_dtype_name(dtype, (self.param_dtype,))
        for variables, values in ((self._params, params), (self._state, state)):
            for name, variable in variables.items():
                variable.assign(values[name])

    def get_config(self):
        # super()'s config carries the dtype policy, serialised as Keras does for its own layers.
        return {
            **super().get_config(),
            "cfg": self.cfg.to_dict(),
            "seed": self.seed,
            "implementation": self.implementation,
            "sparse": self.sparse,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        return cls(PEERConfig.from_dict(config.pop("cfg")), **config)

    def __repr__(self):
        tables = ", ".join(f"{name}: {tuple(v.shape)} {v.dtype}" for name, v in {**self._params, **self._state}.items())
        return (
            f"<PEER name={self.name!r}, {self.cfg!r}, seed={self.seed!r}, dtype_policy="
            f"{self.dtype_policy.name!r}, implementation={self.implementation!r}, sparse={self.sparse}; {tables}>"
        )


def _apply(compute, cfg, params, state, x, training, mask, routing, low, implementation, sparse=False):
    """(y, new_state, aux) of the computing backend on the variables' values."""
    if compute.name != "tensorflow":
        return compute.apply(
            cfg, params, state, x, training, mask, routing, compute_dtype=low, implementation=implementation
        )
    # Inside Keras's traced train step: the traceable forward, without the functional API's
    # compiled function and its reading of routing values.
    import tensorflow as tf

    from ..tensorflow.core import meta
    from ..tensorflow.peer import choose_implementation, float32_means_float32, forward

    choose_implementation(implementation)
    float32_means_float32()
    dtype = checks.check_dtype_name(params["experts.down"].dtype.name)
    optional = (None if v is None else meta(v) for v in (mask, routing))
    checks.check_call(cfg, dtype, meta(x), training, *optional, compute_dtype=low)

    def flat(t, tail):
        return None if t is None else tf.reshape(t, (-1,) + tail)

    y, new_state, aux = forward(
        cfg,
        params,
        state,
        flat(x, (cfg.d_model,)),
        training,
        flat(mask, ()),
        flat(routing, (cfg.heads, cfg.topk)),
        low=low,
        sparse=sparse,
    )
    lead = tf.shape(x)[:-1]
    aux = {key: tf.reshape(value, tf.concat([lead, [cfg.heads, cfg.topk]], 0)) for key, value in aux.items()}
    return tf.reshape(y, tf.concat([lead, [cfg.d_out]], 0)), new_state, aux
