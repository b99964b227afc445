"""SPEC §9.1 Argument errors: the backend refuses each bad input as the reference does.

Judged at the level ``--peer-errors`` sets: ``message`` (the built-in backends' default) requires
the reference's exception class and exact message; ``kind`` (any other backend's default) requires
an error of the spec's kind, a ``ValueError`` (``PEERInputError`` is one), raised before any result.
"""

import numpy as np
import pytest

import peer_ref
from peer_ref import PEERConfig

from .helpers import needs, np_dtype
from .strategies import perturbed_params, require, supported_config

SECTION = "§9.1 Argument errors"

CFG = PEERConfig(d_model=6, n_experts=9, heads=2, topk=2, d_key=4)
GLU_CFG = PEERConfig(d_model=6, n_experts=9, heads=2, topk=2, d_key=4, expert_glu=True)


def _valid(cfg=CFG):
    cfg = supported_config(cfg)
    params = {k: v.astype(np.float32) for k, v in perturbed_params(cfg, 0).items()}
    _, state = peer_ref.init(cfg, seed=0, dtype="float32")
    rng = np.random.default_rng(0)
    return {
        "cfg": cfg,
        "params": params,
        "state": state,
        "x": rng.standard_normal((2, 3, 6)).astype(np.float32),
        "training": True,
        "mask": None,
        "routing": None,
        "dy": rng.standard_normal((2, 3, 6)).astype(np.float32),
    }


def _with_gate(args, gate):
    return {**args, "params": {**args["params"], "experts.gate": gate}}


def _glu(change):
    """A scenario on a layer with GLU experts (the argument built for CFG is ignored)."""
    return lambda _: change(_valid(GLU_CFG))


def _drop(tree, name):
    return {k: v for k, v in tree.items() if k != name}


SCENARIOS = {
    "x_wrong_d_model": lambda a: {**a, "x": np.zeros((2, 3, 5), np.float32)},
    "x_scalar": lambda a: {**a, "x": np.zeros((), np.float32)},
    "x_dtype_mismatch": lambda a: {**a, "x": a["x"].astype(np.float64)},
    "x_bfloat16_with_float32_params": lambda a: {**a, "x": a["x"].astype(np_dtype("bfloat16"))},
    "mask_wrong_shape": lambda a: {**a, "mask": np.ones((2, 4), bool)},
    "mask_not_bool": lambda a: {**a, "mask": np.ones((2, 3), np.int32)},
    "routing_wrong_shape": lambda a: {**a, "routing": np.zeros((2, 3, 2, 3), np.int64)},
    "routing_not_integer": lambda a: {**a, "routing": np.zeros((2, 3, 2, 2), np.float32)},
    "routing_out_of_range": lambda a: {**a, "routing": np.full((2, 3, 2, 2), 9, np.int64)},
    "routing_negative": lambda a: {**a, "routing": np.full((2, 3, 2, 2), -1, np.int64)},
    "params_missing_name": lambda a: {**a, "params": _drop(a["params"], "experts.up")},
    "params_extra_name": lambda a: {**a, "params": {**a["params"], "experts.gate": a["params"]["experts.up"]}},
    "params_wrong_shape": lambda a: {**a, "params": {**a["params"], "experts.down": np.zeros((9, 7), np.float32)}},
    "params_mixed_dtypes": lambda a: {
        **a,
        "params": {**a["params"], "keys.left": a["params"]["keys.left"].astype(np.float64)},
    },
    "glu_gate_missing": _glu(lambda a: {**a, "params": _drop(a["params"], "experts.gate")}),
    "glu_gate_wrong_shape": _glu(lambda a: _with_gate(a, np.zeros((9, 5), np.float32))),
    "glu_gate_wrong_dtype": _glu(lambda a: _with_gate(a, a["params"]["experts.gate"].astype(np.float64))),
    "state_missing_name": lambda a: {**a, "state": _drop(a["state"], "query_norm.var")},
    "training_not_bool": lambda a: {**a, "training": 1},
    "dy_wrong_shape": lambda a: {**a, "dy": np.zeros((2, 3, 7), np.float32)},
    # SPEC §7.1 sparse= (vjp only)
    "dy_sparse_not_bool": lambda a: {**a, "sparse": 1},
    "dy_sparse_string": lambda a: {**a, "sparse": "yes"},
    # SPEC §10.3 compute_dtype
    "compute_dtype_unknown": lambda a: {**a, "compute_dtype": "int8"},
    "compute_dtype_not_a_name": lambda a: {**a, "compute_dtype": 16},
    "compute_dtype_float64_with_float32_params": lambda a: {**a, "compute_dtype": "float64"},
    "compute_dtype_float16_with_float64_params": lambda a: {
        **a,
        "compute_dtype": "float16",
        "params": _cast(a["params"], "float64"),
        "state": _cast(a["state"], "float64"),
        "x": a["x"].astype(np.float16),
        "dy": a["dy"].astype(np.float16),
    },
    "compute_dtype_float32_with_bfloat16_params": lambda a: {
        **a,
        "compute_dtype": "float32",
        "params": _cast(a["params"], "bfloat16"),
    },
    "compute_dtype_x_float32": lambda a: {**a, "compute_dtype": "bfloat16", "dy": _low(a["dy"], "bfloat16")},
    "compute_dtype_x_other_low_dtype": lambda a: {
        **a,
        "compute_dtype": "bfloat16",
        "x": _low(a["x"], "float16"),
        "dy": _low(a["dy"], "bfloat16"),
    },
    "compute_dtype_dy_float32": lambda a: {**a, "compute_dtype": "float16", "x": _low(a["x"], "float16")},
}


def _cast(tree, dtype):
    return {k: v.astype(np_dtype(dtype)) for k, v in tree.items()}


def _low(array, dtype):
    return array.astype(np_dtype(dtype))


# Capabilities a scenario's (valid) parts need besides the call itself.
NEEDS = {
    "x_dtype_mismatch": ("float64",),
    "x_bfloat16_with_float32_params": ("bfloat16",),
    "compute_dtype_unknown": ("mixed",),
    "compute_dtype_not_a_name": ("mixed",),
    "compute_dtype_float64_with_float32_params": ("mixed",),
    "compute_dtype_float16_with_float64_params": ("mixed", "float64"),
    "compute_dtype_float32_with_bfloat16_params": ("mixed", "bfloat16"),
    "compute_dtype_x_float32": ("mixed",),
    "compute_dtype_x_other_low_dtype": ("mixed",),
    "compute_dtype_dy_float32": ("mixed",),
    "dy_sparse_not_bool": ("sparse_grad",),
    "dy_sparse_string": ("sparse_grad",),
}


# Options of the backend a scenario's (valid) parts need: SPEC §5 masks, §4.4 routing, the state
# of §3.3's batch norm, §3.10's GLU experts.
OPTION_NEEDS = {
    "mask_wrong_shape": {"mask": True},
    "mask_not_bool": {"mask": True},
    "routing_wrong_shape": {"routing": True},
    "routing_not_integer": {"routing": True},
    "routing_out_of_range": {"routing": True},
    "routing_negative": {"routing": True},
    "state_missing_name": {"query_norm": "batch"},
    "glu_gate_missing": {"expert_glu": True},
    "glu_gate_wrong_shape": {"expert_glu": True},
    "glu_gate_wrong_dtype": {"expert_glu": True},
}


def _call(fn, convert, args, with_dy):
    c, cfg = convert, args["cfg"]
    common = dict(training=args["training"], mask=c(args["mask"]), routing=c(args["routing"]))
    if args.get("compute_dtype") is not None:
        common["compute_dtype"] = args["compute_dtype"]
    if "sparse" in args:
        common["sparse"] = args["sparse"]
    if with_dy:
        return fn(cfg, c(args["params"]), c(args["state"]), c(args["x"]), c(args["dy"]), **common)
    return fn(cfg, c(args["params"]), c(args["state"]), c(args["x"]), **common)


CALLS = [
    (scenario, entry)
    for scenario in sorted(SCENARIOS)
    for entry in ("apply", "vjp")
    if not (entry == "apply" and (scenario.startswith("dy_") or scenario.endswith("_dy_float32")))
]


@pytest.mark.parametrize(("scenario", "entry"), CALLS)
def test_bad_input_raises_like_the_reference(backend, scenario, entry, error_kind):
    if entry == "vjp":
        needs(backend, "grad")
    for capability in NEEDS.get(scenario, ()):
        needs(backend, capability)
    require(**OPTION_NEEDS.get(scenario, {}))
    args = SCENARIOS[scenario](_valid())
    with_dy = entry == "vjp"
    ref_fn = peer_ref.forward if entry == "apply" else peer_ref.vjp
    with pytest.raises(peer_ref.PEERInputError) as expected:
        _call(ref_fn, lambda t: t, args, with_dy)
    try:
        _call(getattr(backend, entry), backend.from_numpy, args, with_dy)
    except Exception as err:  # judged below, by kind or by class and message
        got = err
    else:
        pytest.fail(
            f"{backend.name}.{entry} raised nothing, but should raise {type(expected.value).__name__}: "
            f"{expected.value!s} [{scenario}]",
            pytrace=False,
        )
    if error_kind == "kind":
        assert isinstance(got, ValueError), (
            f"{backend.name}.{entry} raised {type(got).__name__}: {got!s}, but should raise a ValueError "
            f"(the reference: {expected.value!s}) [{scenario}]"
        )
        return
    assert isinstance(got, type(expected.value)) and str(got) == str(expected.value), (
        f"{backend.name}.{entry} raised {type(got).__name__}: {got!s}, but should raise "
        f"{type(expected.value).__name__}: {expected.value!s} [{scenario}]"
    )


def _needs_implementations(backend):
    if not hasattr(backend, "implementations"):
        pytest.skip(f"backend {backend.name!r} offers no choice of implementation (no 'implementations')")


@pytest.mark.parametrize("entry", ["apply", "vjp"])
@pytest.mark.parametrize("implementation", ["no-such-kernels", 3])
def test_unknown_implementation_is_refused(backend, entry, implementation):
    """``implementation=`` (the contract): a name the backend does not offer raises PEERConfigError
    naming the argument, the value and the backend's implementations."""
    if entry == "vjp":
        needs(backend, "grad")
    _needs_implementations(backend)
    args = _valid()
    fn = getattr(backend, entry)
    fn = getattr(fn, "func", fn)  # the suite may pass its own implementation= by default
    common = dict(training=False, implementation=implementation)
    call = [args["cfg"], *(backend.from_numpy(args[k]) for k in ("params", "state", "x"))]
    if entry == "vjp":
        call.append(backend.from_numpy(args["dy"]))
    with pytest.raises(peer_ref.PEERConfigError) as got:
        fn(*call, **common)
    message = str(got.value)
    assert f"implementation={implementation!r}" in message and all(
        name in message for name in backend.implementations
    ), message


def test_implementations_are_named(backend):
    """``implementations`` is a non-empty tuple of distinct names (the contract)."""
    _needs_implementations(backend)
    names = backend.implementations
    assert isinstance(names, tuple) and names and len(set(names)) == len(names), names
    assert all(isinstance(n, str) and n for n in names), names
