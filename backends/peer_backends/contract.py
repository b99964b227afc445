"""The backend contract: what a module must provide to be a PEER backend.

Every built-in backend (``peer_backends.numpy``, ``.torch``, ``.jax``, ``.tensorflow``)
is a package with the same files — ``__init__.py`` (the attributes below),
``core.py`` (array conversion, dtype names, the mixed mode's rounding), ``peer.py``
(init/apply/vjp: validation, assembly, compilation) and ``layer.py`` (the framework's
idiomatic layer) — and the torch, JAX and TensorFlow backends split the layer into modules
named after the spec's parts: ``query_norm.py`` (§3.3), ``routing.py`` (§3.4-§3.9, §4) and
``experts.py`` (§3.10-§3.11, on the framework's own kernels), with ``kernels.py`` beside
them where fused GPU kernels replace ``experts.py`` (torch: Triton; JAX: Pallas) and
``parallel.py`` where expert tables sharded by columns do (torch, JAX). JAX also has
``sparse.py``, for what only JAX needs of SPEC §7.1's row-sparse gradients (their padded
``RowSparse`` form and optax steps on their rows; torch's counterpart, the sparse tables for
``SparseAdam``, is in its ``layer.py``); the rows themselves are found and gathered in every
backend's ``experts.py``. ``peer.py`` assembles
the forward once; the expert stage is its one seam, chosen by the ``implementation`` name. (The
NumPy backend's parts are the reference's own modules, ``peer_ref.forward_pass``, ``.routing``,
``.backward_pass``.) The same role has the same name in every backend: ``ROLES`` below. A
reader who knows one backend knows where everything is in the others.
A third-party backend only needs the attributes.

Semantics are those of spec/SPEC.md and ``peer_ref``; a backend implements them and
never re-decides them. Argument errors are raised through ``peer_ref.checks`` so every
backend raises the same exception classes with the same messages.

Attributes
----------
name : str
    Canonical backend name.
version : str
    Version of the framework underneath.
capabilities : frozenset[str]
    Subset of {"float64", "float32", "bfloat16", "float16", "mixed", "grad", "sparse_grad", "jit",
    "gpu"}. "mixed" means apply/vjp take ``compute_dtype="bfloat16"|"float16"`` with float32
    parameters (SPEC §10.3). "sparse_grad" means vjp takes ``sparse=True`` (SPEC §7.1). Conformance tests needing a capability the backend lacks are
    skipped with that reason.
init(cfg, seed=0, dtype=None) -> (params, state)
    Native arrays keyed by canonical names, drawn from the distributions of SPEC §8.
    ``dtype`` None means the backend's default ("float32"; "float64" for numpy).
apply(cfg, params, state, x, training=False, mask=None, routing=None, *, jit=None, compute_dtype=None,
      implementation=None)
    -> (y, new_state, aux). ``compute_dtype`` None (or the parameters' dtype) is the default
    mode; a low dtype name with float32 parameters is the mixed mode (SPEC §10.3). ``jit`` None = the backend's default path, True = the
    compiled path (torch.compile / jax.jit / tf.function(jit_compile=True)), False = eager.
    ``implementation`` names the kernels of the expert stage and its backward (one of the
    backend's ``implementations``): None picks the best available for the device, a name forces
    one, and one that cannot run here raises PEERConfigError naming those that can.
    aux holds "indices" (an integer dtype: int64, or int32 where the framework has no
    int64 enabled), "scores" and "weights", each (..., heads, topk).
vjp(cfg, params, state, x, dy, training=False, mask=None, routing=None, *, jit=None, compute_dtype=None,
    implementation=None)
    -> (grads, dx), computed with the framework's own autodiff. grads has every
    trainable parameter under its canonical name. A backend with the "sparse_grad" capability
    also takes ``sparse=False``; ``sparse=True`` returns the expert tables' gradients in the
    framework's row-sparse form (SPEC §7.1), which ``to_numpy`` turns into ``peer_ref.RowSparse``.
from_numpy(tree), to_numpy(tree)
    Convert a (nested) dict/tuple/list of arrays; None passes through. bfloat16 maps
    to ``ml_dtypes.bfloat16`` on the NumPy side. Nothing is cast.
layer(cfg, **kwargs)
    The framework's idiomatic layer (nn.Module, Flax module, Keras layer, ...), whose
    parameters and statistics carry the canonical names; the backend module also exports its
    class as ``PEER``. It seeds as the framework's own layers do, and ``seed=`` gives the
    reference's tables (SPEC §8). A call takes x, ``mask`` (True keeps a token) and
    ``routing`` and returns y, or ``(y, aux)`` with ``return_aux=True``: the routing comes back
    as a return value in every framework, as attention layers return their weights when asked
    (torch ``need_weights``, Keras ``return_attention_scores``), which also keeps a JAX call pure.

Optional, for a backend with more than one implementation of the expert stage:

implementations : tuple[str, ...]
    Every implementation name the backend knows, the default first where it can run: numpy
    ("numpy",), torch ("aten", "triton", "sharded"), jax ("xla", "pallas", "sharded"), tensorflow
    ("tensorflow",). "sharded" runs where, and only where, the expert tables are sharded.
    apply and vjp then take ``implementation=`` (above); the conformance suite runs against
    one with ``--peer-implementation NAME``.

default_path : str
    "eager" or "compiled": the path ``jit=None`` runs. Where given, the conformance suite checks
    that path once (every module runs it) rather than twice.

Optional hooks, called by the conformance suite when present:

enable_float64()
    Switch on float64 where the framework needs asking (JAX's x64 mode); called once
    before the tests of a backend that declares "float64".
clear_caches()
    Drop compiled specialisations; called between test modules so a long test process
    does not accumulate thousands of compiled executables.

Optional, declared options (for a backend that implements part of SPEC §1):

options : Mapping[str, Iterable]
    The values of each option the backend supports; an option left out, or no ``options`` at all,
    supports every value. Option names and values are those of ``peer_backends.options.OPTIONS``:
    config fields (``shared_keys``, ``query_norm``, ``query_bias``, ``activation``, ``score``,
    ``expert_bias``, ``expert_glu``), widths (``d_out``: "d_model" | "other"; ``d_model``:
    "even" | "odd") and call features (``mask``, ``routing``: False | True). The conformance suite
    draws only supported configs and reports a rule that needs another value as not supported,
    naming the option (``peer_backends.options`` has the helpers).
"""

from __future__ import annotations

from typing import NamedTuple

ATTRIBUTES = ("name", "version", "capabilities", "init", "apply", "vjp", "from_numpy", "to_numpy", "layer")


# ---------------------------------------------------------------------------- roles
#
# Inside the built-in backends one role has one name (as across Keras 3's ``backend/*``): the
# table below gives, for each role, the attribute every one of the torch, JAX and TensorFlow
# backends defines (relative to the backend's package), and what the NumPy backend uses instead
# (an absolute path into the reference, or None where the role does not arise). Roles shared by
# every backend live once outside them: argument checks in ``peer_ref.checks``
# (``check_arguments``), the implementation choice in ``peer_backends._implementation``, the
# sharded tables' layout in ``peer_backends.sharding``. tests/test_api.py checks the table.


class Role(NamedTuple):
    role: str
    name: str  # "module.attribute" inside peer_backends.{torch,jax,tensorflow}
    numpy: str | None  # the NumPy backend's: "peer_backends.numpy..." or "peer_ref...", or None


ROLES = (
    Role(
        "expert-stage implementation names, the default first",
        "peer.IMPLEMENTATIONS",
        "peer_backends.numpy.peer.IMPLEMENTATIONS",
    ),
    Role(
        "choose the implementation (peer_backends._implementation.choose)",
        "peer.choose_implementation",
        "peer_backends.numpy.peer.choose_implementation",
    ),
    Role(
        "validate the arguments of apply/vjp (peer_ref.checks.check_arguments)",
        "peer.validate",
        "peer_ref.forward_pass.validate",
    ),
    Role("a compute_dtype given as a framework dtype, as a name", "peer.compute_dtype_name", None),
    Role(
        "the forward, routing and expert stage assembled once for every implementation",
        "peer.forward",
        "peer_ref.forward_pass.forward",
    ),
    Role("drop compiled functions (the contract's clear_caches)", "peer.clear_caches", None),
    Role("the query batch norm (SPEC §3.3)", "query_norm.query_norm", "peer_ref.forward_pass.query_norm"),
    Role("the routing (SPEC §3.4-§3.9, §4)", "routing.route", None),
    Role("the expert stage of the default implementation (SPEC §3.10-§3.11)", "experts.expert_stage", None),
    Role("the activations of the expert stage", "experts.activation", "peer_ref.functions.activation"),
    Role(
        "the rows a call selected (SPEC §7.1): sorted unique experts of the valid tokens, and each "
        "selection renumbered into them",
        "experts.selected_rows",
        "peer_ref.gradient_rows",
    ),
    Role(
        "gather those rows into a small table whose gradient with respect to the table is row-sparse",
        "experts.take_rows",
        None,
    ),
    Role("the framework dtype of a dtype name", "core.native_dtype", None),
    Role("an array's dtype name", "core.dtype_name", "peer_backends.numpy.core.dtype_name"),
    Role("an array's (shape, dtype name) for peer_ref.checks", "core.meta", "peer_ref.forward_pass.meta"),
    Role("round to the mixed mode's low dtype, straight-through gradient (SPEC §10.3)", "core.round_through", None),
)
