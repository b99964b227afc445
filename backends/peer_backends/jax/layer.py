"""PEER as a flax.nnx module.

Canonical names are the module's state paths joined by ".": the module holds four
sub-modules, ``query``, ``query_norm``, ``keys`` and ``experts``, whose attributes are
``nnx.Param`` for trainable parameters ("query.kernel", "keys.left", "experts.down", ...)
and ``nnx.BatchStat`` for the running statistics ("query_norm.mean", "query_norm.var").
So ``nnx.state(module, nnx.Param)`` flattened with "." gives exactly the contract's names,
and ``params_and_state()`` / ``load_params_and_state()`` move flat canonical dicts in and out.

Training vs evaluation follows nnx.BatchNorm: the ``use_running_average`` attribute,
flipped by ``module.train()`` / ``module.eval()`` or overridden per call.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from peer_ref import checks
from peer_ref.errors import PEERInputError

from .core import dtype_name, from_numpy
from .peer import apply, init_from_key

_GROUPS = ("query", "query_norm", "keys", "experts")


class _Group(nnx.Module):
    """Holds the variables of one canonical-name prefix, e.g. ``query_norm``."""


class PEER(nnx.Module):
    """A PEER layer (see peer_ref / SPEC) with canonically named nnx variables.

    Args:
      cfg: the PEERConfig.
      rngs: nnx.Rngs whose ``params`` stream draws the initial parameters; without it,
        ``seed`` does, giving the same parameters as ``peer_backends.jax.init(cfg, seed)``.
      dtype: "float32" (default), "bfloat16", or "float64" (needs jax_enable_x64).
      use_running_average: start in evaluation mode (running batch-norm statistics).
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs | None = None, seed: int = 0, dtype: str | None = None,
                 use_running_average: bool = False):
        self.cfg = cfg
        self.use_running_average = use_running_average
        # (mesh, axis) once peer_backends.jax.parallel.shard_layer has sharded the expert tables.
        self.expert_sharding = None
        key = rngs.params() if rngs is not None else jax.random.key(seed)
        params, state = init_from_key(cfg, key, dtype)
        for group in _GROUPS:
            setattr(self, group, _Group())
        for name, value in params.items():
            self._set(name, nnx.Param(value))
        for name, value in state.items():
            self._set(name, nnx.BatchStat(value))

    def __call__(self, x, mask=None, routing=None, *, use_running_average: bool | None = None,
                 return_aux: bool = False):
        """y = PEER(x); in training mode the running statistics are updated in place.

        ``return_aux=True`` returns ``(y, aux)`` with the routing indices, scores and weights.
        """
        if use_running_average is None:
            use_running_average = self.use_running_average
        training = not use_running_average
        params, state = self.params_and_state()
        if self.expert_sharding is None:
            y, new_state, aux = apply(self.cfg, params, state, x, training=training, mask=mask, routing=routing)
        else:
            from .parallel import apply as sharded_apply

            mesh, axis = self.expert_sharding
            y, new_state, aux = sharded_apply(self.cfg, params, state, x, training=training, mask=mask,
                                              routing=routing, mesh=mesh, axis=axis)
        if training:
            for name, value in new_state.items():
                self._variable(name).set_value(value)
        return (y, aux) if return_aux else y

    def params_and_state(self) -> tuple[dict, dict]:
        """Flat ``(params, state)`` dicts keyed by canonical names (the arrays themselves)."""
        params = {name: self._variable(name).get_value() for name in self.cfg.param_shapes()}
        state = {name: self._variable(name).get_value() for name in self.cfg.state_shapes()}
        return params, state

    def load_params_and_state(self, params: dict, state: dict) -> None:
        """Replace every variable from flat canonical-name dicts (JAX or NumPy arrays).

        Checked like a call: exact names, shapes and one float dtype (SPEC §9).
        """
        meta = lambda tree: {name: (np.shape(v), dtype_name(v)) for name, v in tree.items()}  # noqa: E731
        for arg, value in (("params", params), ("state", state)):
            if not isinstance(value, dict):
                raise PEERInputError(f"{arg} is {type(value).__name__}, but expected a dict of arrays")
        checks.check_params_state(self.cfg, meta(params), meta(state))
        for name, value in {**params, **state}.items():
            self._variable(name).set_value(value if isinstance(value, jax.Array) else from_numpy(value))

    def _set(self, name: str, variable: nnx.Variable) -> None:
        group, leaf = name.split(".")
        setattr(getattr(self, group), leaf, variable)

    def _variable(self, name: str) -> nnx.Variable:
        group, leaf = name.split(".")
        return getattr(getattr(self, group), leaf)


def layer(cfg, **kwargs) -> PEER:
    """``PEER(cfg, **kwargs)``: the backend contract's idiomatic layer."""
    return PEER(cfg, **kwargs)
