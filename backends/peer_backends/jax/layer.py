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

import contextlib
import math

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
from .experts import selected_rows
from .peer import IMPLEMENTATIONS, apply, apply_blocks, init_from_key
from .sparse import EXPERT_TABLES, RowSparse, capacity, row_update

_GROUPS = ("query", "query_norm", "keys", "experts")


class ExpertTable(nnx.Param):
    """The variable type of the expert tables ``experts.down``, ``.up``, ``.gate``, ``.bias`` (SPEC
    §7.1's tables): an ``nnx.Param``, so every filter on ``nnx.Param`` keeps them; filter on
    ``ExpertTable`` (or ``DENSE_PARAMS``) to treat them apart."""


# Every trainable parameter of a model but the PEER layers' expert tables: the dense gradients'
# filter of ``sparse_value_and_grad`` and the ``wrt`` of the dense optimizer beside ``RowOptimizer``.
DENSE_PARAMS = nnx.All(nnx.Param, nnx.Not(ExpertTable))


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
            self._set(name, (ExpertTable if name in EXPERT_TABLES else nnx.Param)(value))
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
        if _CALLS:  # inside sparse_value_and_grad
            y, new_state, aux = _CALLS[-1].apply(self, params, state, x, kwargs)
        else:
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


# ---------------------------------------------------------------------------- row-sparse gradients (SPEC §7.1)

_CALLS: list = []  # the innermost sparse_value_and_grad's record of PEER calls


class _Calls:
    """The PEER calls of one traced function, in call order: when probing (``blocks`` None), each
    call's block shapes; when differentiating, each call's layer, rows and count."""

    def __init__(self, blocks=None):
        self.blocks = blocks
        self.calls = []

    def apply(self, layer, params, state, x, kwargs):
        tables = {name: params[name] for name in EXPERT_TABLES if name in params}
        if self.blocks is None:
            size = capacity(layer.cfg, math.prod(x.shape[:-1]))
            self.calls.append({n: jax.ShapeDtypeStruct((size,) + t.shape[1:], t.dtype) for n, t in tables.items()})
            return apply(layer.cfg, params, state, x, **kwargs)
        if len(self.calls) >= len(self.blocks):
            raise PEERConfigError(
                f"the function made more than {len(self.blocks)} PEER calls, but it made {len(self.blocks)} when "
                "traced for their shapes: sparse_value_and_grad needs the same calls every time it traces it"
            )
        y, new_state, aux = apply_blocks(layer.cfg, params, state, x, self.blocks[len(self.calls)], **kwargs)
        self.calls.append((layer, aux.pop("rows"), aux.pop("count")))
        return y, new_state, aux


@contextlib.contextmanager
def _recording(calls):
    _CALLS.append(calls)
    try:
        yield calls
    finally:
        _CALLS.pop()


def sparse_value_and_grad(fn, *, has_aux: bool = False):
    """``nnx.value_and_grad(fn)`` for a model holding PEER layers, with the expert tables'
    gradients row-sparse (SPEC §7.1) and no (N, d) gradient formed.

    ``sparse_value_and_grad(fn)(model, *args)`` returns ``(value, (grads, table_grads))``:
    ``value`` what ``fn(model, *args)`` returns (with ``has_aux``, ``(loss, aux)``);
    ``grads`` the gradients of every parameter but the expert tables (``DENSE_PARAMS``), an
    ``nnx.State`` as ``nnx.grad`` gives; ``table_grads`` the tree of
    ``nnx.as_pure(nnx.state(model, ExpertTable))`` with a ``RowSparse`` at each table: its rows
    (padded to ``capacity(cfg, tokens)``, the padding ``N``) are the experts the call's valid
    tokens selected, its values the dense gradient's rows there. A layer called several times
    gets the sum over its calls (rows merged), one never called an empty ``RowSparse``.

    Each PEER call inside ``fn`` runs its expert stage on the rows it selected (gathered once),
    and the gradient is taken with respect to those rows; the tables enter as constants. ``fn``
    is traced once more, for shapes only (``jax.eval_shape``), to size the rows: it must make
    the same PEER calls every time. Call it inside ``nnx.jit`` (then that trace is all it costs).
    Implementations "xla" and "pallas"; "sharded" raises PEERConfigError.
    """

    def run(model, *args):
        graphdef, whole = nnx.split(model)

        def probe(whole):
            with _recording(_Calls()) as calls:
                fn(nnx.merge(graphdef, whole), *args)
            return calls.calls

        shapes = []
        jax.eval_shape(lambda whole: shapes.extend(probe(whole)), whole)
        blocks = [{name: jnp.zeros(s.shape, s.dtype) for name, s in call.items()} for call in shapes]
        paths = []

        def inner(model, blocks):
            with _recording(_Calls(blocks)) as calls:
                out = fn(model, *args)
            if len(calls.calls) != len(blocks):
                raise PEERConfigError(
                    f"the function made {len(calls.calls)} PEER calls, but it made {len(blocks)} when traced for "
                    "their shapes: sparse_value_and_grad needs the same calls every time it traces it"
                )
            where = {id(node): path for path, node in nnx.iter_graph(model)}
            paths[:] = [(tuple(where[id(layer)]), layer.cfg.n_experts) for layer, _, _ in calls.calls]
            value, aux = out if has_aux else (out, None)
            return value, (aux, [(rows, count) for _, rows, count in calls.calls])

        step = nnx.value_and_grad(inner, argnums=(nnx.DiffState(0, DENSE_PARAMS), 1), has_aux=True)
        (value, (aux, found)), (grads, block_grads) = step(model, blocks)
        per_layer = {}
        for (path, n), (rows, count), values in zip(paths, found, block_grads):
            call = {name: RowSparse(rows, value, count) for name, value in values.items()}
            per_layer[path] = _merge(per_layer[path], call, n) if path in per_layer else call
        tables = nnx.as_pure(nnx.state(model, ExpertTable))
        table_grads = jax.tree_util.tree_map_with_path(lambda path, table: _table_grad(per_layer, path, table), tables)
        return ((value, aux) if has_aux else value), (grads, table_grads)

    return run


def _key(entry):
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry


def _table_grad(per_layer, path, table):
    keys = tuple(_key(entry) for entry in path)
    layer_path, name = keys[:-2], ".".join(map(str, keys[-2:]))
    if layer_path in per_layer:
        return per_layer[layer_path][name]
    n = table.shape[0]
    return RowSparse(jnp.full((0,), n, jnp.int32), jnp.zeros((0,) + table.shape[1:], table.dtype), jnp.int32(0))


def _merge(first, second, n):
    """The sum of two calls' RowSparse of each table of N = ``n`` rows: rows merged (sorted,
    unique, padded with ``n``), values summed."""
    merged = {}
    for name, a in first.items():
        b = second[name]
        rows = jnp.concatenate([a.rows, b.rows])
        size = min(rows.shape[0], n)
        # The padding entries (zero values) are not valid selections; they may land on any row.
        merged_rows, count, local = selected_rows(rows.reshape(-1, 1, 1), rows < n, n, size)
        values = jax.ops.segment_sum(jnp.concatenate([a.values, b.values]), local.reshape(-1), num_segments=size)
        merged[name] = RowSparse(merged_rows, values, count)
    return merged


class RowOptimizer(nnx.Optimizer):
    """An ``nnx.Optimizer`` for the PEER layers' expert tables (``wrt=ExpertTable``) that takes the
    row-sparse gradients of ``sparse_value_and_grad`` and steps only their rows, in place under a
    donating ``nnx.jit`` (``row_update``): a **lazy** optimizer (SPEC §7.1; see
    ``peer_backends.jax.apply_row_updates`` for what that changes and which ``tx`` work).
    Use an ``nnx.Optimizer(model, tx, wrt=DENSE_PARAMS)`` beside it for the other parameters."""

    def __init__(self, model, tx):
        super().__init__(model, tx, wrt=ExpertTable)

    def update(self, model, grads, /, **kwargs):
        """Step the tables' listed rows with ``grads`` (``sparse_value_and_grad``'s ``table_grads``)."""
        tables = nnx.as_pure(nnx.state(model, ExpertTable))
        new_tables, new_state = row_update(self.tx, tables, nnx.as_pure(self.opt_state), grads)
        nnx.update(model, new_tables)
        nnx.update(self.opt_state, nnx.state(new_state))
        self.step[...] += 1


def layer(cfg, **kwargs) -> PEER:
    """``PEER(cfg, **kwargs)``: the backend contract's idiomatic layer."""
    return PEER(cfg, **kwargs)
