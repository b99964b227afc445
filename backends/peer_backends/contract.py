"""The backend contract: what a module must provide to be a PEER backend.

Every built-in backend (``peer_backends.numpy``, ``.torch``, ``.jax``, ``.tensorflow``)
is a package with the same files — ``__init__.py`` (the attributes below),
``core.py`` (array conversion, dtype names, the mixed mode's rounding), ``peer.py``
(init/apply/vjp: validation, assembly, compilation) and ``layer.py`` (the framework's
idiomatic layer) — and the torch, JAX and TensorFlow backends split the layer into modules
named after the spec's parts: ``query_norm.py`` (§3.3), ``routing.py`` (§3.4-§3.9, §4) and
``experts.py`` (§3.10-§3.11, on the framework's own kernels), with ``kernels.py`` beside
them where fused GPU kernels replace ``experts.py`` (torch: Triton; JAX: Pallas). (The NumPy
backend's parts are the reference's own modules, ``peer_ref.forward_pass``, ``.routing``,
``.backward_pass``.) A reader who knows one backend knows where everything is in the others.
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
    Subset of {"float64", "float32", "bfloat16", "float16", "mixed", "grad", "jit", "gpu"}.
    "mixed" means apply/vjp take ``compute_dtype="bfloat16"|"float16"`` with float32
    parameters (SPEC §10.3). Conformance tests needing a capability the backend lacks are
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
    trainable parameter under its canonical name.
from_numpy(tree), to_numpy(tree)
    Convert a (nested) dict/tuple/list of arrays; None passes through. bfloat16 maps
    to ``ml_dtypes.bfloat16`` on the NumPy side. Nothing is cast.
layer(cfg, **kwargs)
    The framework's idiomatic layer (nn.Module, Flax module, Keras layer, ...), whose
    parameters and statistics carry the canonical names.

Optional, for a backend with more than one implementation of the expert stage:

implementations : tuple[str, ...]
    Every implementation name the backend knows, the default first where it can run: numpy
    ("numpy",), torch ("aten", "triton"), jax ("xla", "pallas"), tensorflow ("tensorflow",).
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

CAPABILITIES = frozenset({"float64", "float32", "bfloat16", "float16", "mixed", "grad", "jit", "gpu"})
ATTRIBUTES = ("name", "version", "capabilities", "init", "apply", "vjp", "from_numpy", "to_numpy", "layer")
