"""PEER as a flax.nnx module.

Canonical names are the module's state paths joined by ".": the module holds four
sub-modules, ``query``, ``query_norm``, ``keys`` and ``experts``, whose attributes are
``nnx.Param`` for trainable parameters ("query.kernel", "keys.left", "experts.down", ...)
and ``nnx.BatchStat`` for the running statistics ("query_norm.mean", "query_norm.var").
So ``nnx.state(module, nnx.Param)`` flattened with "." gives exactly the contract's names,
and ``params_and_state()`` / ``load_params_and_state()`` move flat canonical dicts in and out.

Training vs evaluation follows nnx.BatchNorm: the ``use_running_average`` attribute,
flipped by ``module.train()`` / ``module.eval()`` or overridden per call.

Dtypes follow nnx.Linear: ``param_dtype`` is the storage dtype of the parameters and
``dtype`` the computation dtype; ``dtype=None`` promotes the input with the parameters
(``flax.nnx.nn.dtypes.promote_dtype``), so bfloat16 activations meet float32 parameters in
float32. See ``PEER`` for how each combination maps onto the functional API.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes

from peer_ref import checks
from peer_ref.config import DTYPES
from peer_ref.errors import PEERConfigError, PEERInputError

from .._implementation import check_known
from .._layer import check_seed, reference_tables
from .core import from_numpy, meta, require_x64
from .peer import IMPLEMENTATIONS, apply, init_from_key

_GROUPS = ("query", "query_norm", "keys", "experts")


class _Group(nnx.Module):
    """Holds the variables of one canonical-name prefix, e.g. ``query_norm``."""


class PEER(nnx.Module):
    """A PEER layer (see peer_ref / SPEC) with canonically named nnx variables.

    Args:
      cfg: the PEERConfig.
      rngs: nnx.Rngs whose ``params`` stream draws the initial parameters, as for
        ``nnx.Linear``; give it or ``seed``.
      seed: instead of ``rngs``, an int: the reference's tables ``peer_ref.init(cfg, seed)``
        rounded to ``param_dtype``, the same values in every framework (SPEC §8).
      dtype: the computation dtype, a JAX dtype (e.g. ``jnp.bfloat16``), or None (default)
        to promote the input with the parameters as ``nnx.Linear`` does
        (``jnp.promote_types(x.dtype, param_dtype)``: bfloat16 x with float32 parameters
        computes in float32).
      param_dtype: the storage dtype of the parameters, a JAX dtype: ``jnp.float32``
        (default), ``jnp.bfloat16``, ``jnp.float16`` or ``jnp.float64`` (needs
        jax_enable_x64). The batch-norm statistics are stored in float32 for the 16-bit
        dtypes (SPEC §10).
      use_running_average: start in evaluation mode (running batch-norm statistics).
      implementation: the expert-stage kernels every call runs, a name of
        ``peer_backends.jax.implementations`` ("xla" or "pallas") or None (default) for the best
        on the default device (see the functional API's ``implementation=``); checked here.

    A call casts x (a floating array) to the computation dtype c, as ``nnx.Linear`` does, then:
    c equal to ``param_dtype`` calls the functional API as is; c a 16-bit dtype with
    float32 parameters uses its mixed mode (``compute_dtype=c``: float32 parameters,
    statistics and routing, rows read in c, y in c; SPEC mixed precision); any other c casts
    the parameters and statistics to c for the call (differentiably) and writes the updated
    statistics back in their storage dtype. y has dtype c.

    The routing of a call comes back with ``return_aux=True`` (a return value, not a
    side effect, so the call stays a pure function under ``nnx.jit``).

    Raises:
      PEERInputError: ``dtype`` or ``param_dtype`` given as a string or as an unsupported
        dtype; x not a floating array.
      PEERConfigError: neither or both of ``rngs`` and ``seed``, a seed that is not an int >= 0,
        an unknown ``implementation``, or one that cannot run here.
    """

    def __init__(
        self,
        cfg,
        *,
        rngs: nnx.Rngs | None = None,
        seed: int | None = None,
        dtype=None,
        param_dtype=jnp.float32,
        use_running_average: bool = False,
        implementation=None,
    ):
        check_known("jax", implementation, IMPLEMENTATIONS)  # whether it runs depends on where the tables live
        self.cfg = cfg
        self.implementation = implementation
        self.dtype = None if dtype is None else _jax_dtype("dtype", dtype)
        self.param_dtype = _jax_dtype("param_dtype", param_dtype)
        self.use_running_average = use_running_average
        self.seed = check_seed(seed)
        if (rngs is None) == (seed is None):
            given = "neither" if rngs is None else "both"
            raise PEERConfigError(
                f"PEER(cfg) got {given} of rngs= and seed=, but expected one: rngs=nnx.Rngs(...) to draw the "
                "parameters as nnx.Linear does, or seed=<int> for the reference's tables (SPEC §8)"
            )
        if rngs is not None:
            if not isinstance(rngs, nnx.Rngs):
                raise PEERConfigError(f"rngs is {type(rngs).__name__}, but expected an nnx.Rngs, e.g. nnx.Rngs(0)")
            params, state = init_from_key(cfg, rngs.params(), self.param_dtype.name)
        else:
            if self.param_dtype.name == "float64":
                require_x64("param_dtype")
            params, state = reference_tables(cfg, self.seed, self.param_dtype.name)
            params = {name: jnp.asarray(value).astype(self.param_dtype) for name, value in params.items()}
            state = {name: jnp.asarray(value) for name, value in state.items()}
        for group in _GROUPS:
            setattr(self, group, _Group())
        for name, value in params.items():
            self._set(name, nnx.Param(value))
        for name, value in state.items():
            self._set(name, nnx.BatchStat(value))

    def __call__(
        self, x, mask=None, routing=None, *, use_running_average: bool | None = None, return_aux: bool = False
    ):
        """y = PEER(x); in training mode the running statistics are updated in place.

        Args:
          x: (..., d_model) floating array, cast to the computation dtype (class doc).
          mask: optional bool array of shape ``x.shape[:-1]``; **True keeps a token**, False
            drops it (zero output, left out of the batch-norm statistics; SPEC §5), as the
            ``mask`` of ``nnx.MultiHeadAttention`` (True attends) and the opposite of torch's
            ``key_padding_mask``.
          routing: optional int array (..., heads, topk) of expert indices that replaces the
            product-key search (SPEC §4).
          use_running_average: overrides the module's mode for this call (True: evaluation).
          return_aux: also return the routing of this call.

        Returns:
          y, (..., d_out) in the computation dtype; with ``return_aux=True``, ``(y, aux)`` where
          aux holds "indices" (int32), "scores" and "weights", each (..., heads, topk).

        Raises:
          PEERInputError: x not floating, or x, mask or routing of the wrong shape or dtype
            (SPEC §9).
        """
        if use_running_average is None:
            use_running_average = self.use_running_average
        training = not use_running_average
        params, state = self.params_and_state()
        x, params, state, mixed = self._promote(x, params, state)
        kwargs = {"training": training, "mask": mask, "routing": routing, "implementation": self.implementation}
        if mixed is not None:
            kwargs["compute_dtype"] = mixed
        y, new_state, aux = apply(self.cfg, params, state, x, **kwargs)
        if training:
            for name, value in new_state.items():
                variable = self._variable(name)
                variable.set_value(value.astype(variable.get_value().dtype))
        return (y, aux) if return_aux else y

    def _promote(self, x, params, state):
        """(x, params, state, compute_dtype keyword or None) for the computation dtype."""
        x_dtype = getattr(x, "dtype", None)
        if x_dtype is None or not jnp.issubdtype(x_dtype, jnp.floating):
            raise PEERInputError(
                f"x.dtype={x_dtype}, but expected a floating array (it is promoted with "
                f"param_dtype={self.param_dtype.name} as nnx.Linear does)"
            )
        stored = self.param_dtype
        compute = jnp.dtype(nnx_dtypes.canonicalize_dtype(x, jnp.zeros((), stored), dtype=self.dtype))
        x = x.astype(compute)
        if compute == stored:
            return x, params, state, None
        if stored == jnp.float32 and compute.name in ("bfloat16", "float16"):
            return x, params, state, compute.name
        name = checks.check_dtype_name(compute.name)
        params = {k: v.astype(compute) for k, v in params.items()}
        state = {k: v.astype(checks.state_dtype(name)) for k, v in state.items()}
        return x, params, state, None

    def params_and_state(self) -> tuple[dict, dict]:
        """Flat ``(params, state)`` dicts keyed by canonical names (the arrays themselves)."""
        params = {name: self._variable(name).get_value() for name in self.cfg.param_shapes()}
        state = {name: self._variable(name).get_value() for name in self.cfg.state_shapes()}
        return params, state

    def load_params_and_state(self, params: dict, state: dict) -> None:
        """Replace every variable from flat canonical-name dicts (JAX or NumPy arrays).

        Checked like a call: exact names, shapes and one float dtype (SPEC §9).
        """
        checks.check_trees(self.cfg, params, state, meta)
        for name, value in {**params, **state}.items():
            self._variable(name).set_value(value if isinstance(value, jax.Array) else from_numpy(value))

    def _set(self, name: str, variable: nnx.Variable) -> None:
        group, leaf = name.split(".")
        setattr(getattr(self, group), leaf, variable)

    def _variable(self, name: str) -> nnx.Variable:
        group, leaf = name.split(".")
        return getattr(getattr(self, group), leaf)


def _jax_dtype(arg: str, value) -> np.dtype:
    if isinstance(value, str):
        example = value if value.isidentifier() else "float32"
        raise PEERInputError(
            f"{arg}={value!r} is a string, but expected a JAX dtype such as jnp.{example} "
            "(as in nnx.Linear: dtype is the computation dtype, param_dtype the parameters' storage dtype)"
        )
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        raise PEERInputError(f"{arg}={value!r}, but expected a JAX floating dtype such as jnp.float32") from None
    if dtype.name not in DTYPES:
        raise PEERInputError(f"{arg}={dtype.name}, but expected one of {tuple(DTYPES)} (as JAX dtypes)")
    return dtype


def layer(cfg, **kwargs) -> PEER:
    """``PEER(cfg, **kwargs)``: the backend contract's idiomatic layer."""
    return PEER(cfg, **kwargs)
