"""PEERConfig validation and serialisation (SPEC §1): every bad field names itself, its value and the rule."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import peer_ref

VALID = dict(d_model=8, n_experts=16, heads=2, topk=2, d_key=4)


def _raises(field: str, value, expected: str, **overrides):
    """Constructing with ``overrides`` fails with a message naming field, value and constraint."""
    with pytest.raises(peer_ref.PEERConfigError) as info:
        peer_ref.PEERConfig(**{**VALID, **overrides})
    message = str(info.value)
    prefix = f"PEERConfig.{field}={value!r}, but expected "
    assert message.startswith(prefix), f"message={message!r}, but should start with {prefix!r}"
    assert re.search(expected, message), f"message={message!r}, but should mention {expected!r}"


@pytest.mark.parametrize("field", ["d_model", "n_experts", "heads", "topk", "d_out"])
@pytest.mark.parametrize("value", [0, -3, 2.0, True, "4", None])
def test_int_fields(field, value):
    if field == "d_out" and value is None:
        return  # None means "same as d_model"
    _raises(field, value, r"an int >= 1", **{field: value})


@pytest.mark.parametrize("value", [0, 1, 3, 5, 2.0, True])
def test_d_key_is_an_even_int_at_least_two(value):
    expected = (
        r"an even int" if isinstance(value, int) and not isinstance(value, bool) and value >= 2 else r"an int >= 2"
    )
    _raises("d_key", value, expected, d_key=value)


@pytest.mark.parametrize("value", [2, 3, 8, 15, 17, 1000])
def test_n_experts_is_a_perfect_square(value):
    _raises("n_experts", value, r"a perfect square", n_experts=value, topk=1)


def test_n_experts_at_most_the_int32_index_range():
    # SPEC §1: the largest N whose expert indices fit int32; n_keys = 46341 is the case that wrapped
    # to a negative index in JAX without x64.
    largest = peer_ref.MAX_N_KEYS**2
    assert largest == 46340**2 == 2_147_395_600 < 2**31 - 1
    assert peer_ref.PEERConfig(**{**VALID, "n_experts": largest}).n_keys == 46340
    _raises("n_experts", 46341**2, r"<= 46340\*\*2 = 2147395600 \(expert indices must fit int32\)", n_experts=46341**2)


def test_topk_at_most_n_keys():
    _raises("topk", 5, r"<= n_keys = isqrt\(n_experts\) = 4", topk=5)
    assert peer_ref.PEERConfig(**{**VALID, "topk": 4}).topk == 4


@pytest.mark.parametrize("field", ["shared_keys", "query_bias", "expert_bias", "expert_glu"])
@pytest.mark.parametrize("value", [0, 1, "True", None, 1.0])
def test_bool_fields(field, value):
    _raises(field, value, r"a bool", **{field: value})


@pytest.mark.parametrize(
    "field, choices",
    [
        ("activation", peer_ref.ACTIVATIONS),
        ("score", peer_ref.SCORES),
        ("query_norm", peer_ref.QUERY_NORMS),
    ],
)
@pytest.mark.parametrize("value", ["GELU", "tanh", "layer", "", None, 1])
def test_choice_fields(field, choices, value):
    _raises(field, value, re.escape(f"one of {choices}"), **{field: value})


_FINITE = r"a finite float"


@pytest.mark.parametrize(
    "value, expected",
    [
        (-0.1, r"a float in \[0.0, 1.0\]"),
        (1.5, r"a float in \[0.0, 1.0\]"),
        (2, r"a float in \[0.0, 1.0\]"),
        (float("nan"), _FINITE),
        (float("inf"), _FINITE),
        (True, _FINITE),
        ("0.1", _FINITE),
        (None, _FINITE),
    ],
)
def test_bn_momentum_in_unit_interval(value, expected):
    _raises("bn_momentum", value, expected, bn_momentum=value)


@pytest.mark.parametrize(
    "value, expected",
    [
        (0.0, r"a float in \(0.0, inf\]"),
        (0, r"a float in \(0.0, inf\]"),
        (-1e-5, r"a float in \(0.0, inf\]"),
        (float("nan"), _FINITE),
        (float("inf"), _FINITE),
        (False, _FINITE),
        ("1e-5", _FINITE),
    ],
)
def test_bn_eps_positive(value, expected):
    _raises("bn_eps", value, expected, bn_eps=value)


def test_boundary_values_are_accepted():
    for momentum in (0.0, 1.0, 0, 1):
        assert peer_ref.PEERConfig(**VALID, bn_momentum=momentum).bn_momentum == momentum
    assert peer_ref.PEERConfig(**VALID, bn_eps=1e-300).bn_eps == 1e-300
    minimal = peer_ref.PEERConfig(d_model=1, n_experts=1, heads=1, topk=1, d_key=2)
    assert (minimal.n_keys, minimal.d_half, minimal.d_out) == (1, 1, 1)


def test_defaults_and_derived_sizes():
    cfg = peer_ref.PEERConfig(**VALID, shared_keys=False)
    assert cfg.d_out == 8 and cfg.n_keys == 4 and cfg.key_sets == 2 and cfg.d_query == 8 and cfg.d_half == 2
    assert (cfg.query_norm, cfg.activation, cfg.score) == ("batch", "gelu", "softmax")
    assert (cfg.bn_momentum, cfg.bn_eps, cfg.query_bias, cfg.expert_bias) == (0.1, 1e-5, False, True)
    assert peer_ref.PEERConfig(**VALID).key_sets == 1
    assert peer_ref.PEERConfig(**VALID).expert_glu is False
    assert "experts.gate" not in peer_ref.PEERConfig(**VALID).param_shapes()
    glu = peer_ref.PEERConfig(**VALID, expert_glu=True, d_out=5)
    assert glu.param_shapes()["experts.gate"] == (16, 8), "experts.gate reads x: (n_experts, d_model)"


def test_from_dict_without_expert_glu_defaults_to_false():
    """Configs saved before expert_glu existed (checkpoints, vectors) load as plain experts."""
    data = peer_ref.PEERConfig(**VALID).to_dict()
    del data["expert_glu"]
    assert peer_ref.PEERConfig.from_dict(data).expert_glu is False


def test_config_is_frozen():
    cfg = peer_ref.PEERConfig(**VALID)
    with pytest.raises(AttributeError):
        cfg.heads = 3


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(peer_ref.PEERConfigError, match=r"unknown field\(s\) \['n_head', 'zzz'\].*expected only"):
        peer_ref.PEERConfig.from_dict({**VALID, "n_head": 2, "zzz": 0})


def test_from_dict_validates():
    with pytest.raises(peer_ref.PEERConfigError, match=r"PEERConfig.heads=0"):
        peer_ref.PEERConfig.from_dict({**VALID, "heads": 0})


@st.composite
def configs(draw):
    n_keys = draw(st.integers(1, 40))
    d_out = draw(st.none() | st.integers(1, 64))
    return peer_ref.PEERConfig(
        d_model=draw(st.integers(1, 64)),
        n_experts=n_keys * n_keys,
        heads=draw(st.integers(1, 8)),
        topk=draw(st.integers(1, n_keys)),
        d_key=2 * draw(st.integers(1, 16)),
        d_out=d_out,
        shared_keys=draw(st.booleans()),
        query_norm=draw(st.sampled_from(peer_ref.QUERY_NORMS)),
        bn_momentum=draw(st.floats(0, 1)),
        bn_eps=draw(st.floats(1e-12, 1.0)),
        query_bias=draw(st.booleans()),
        activation=draw(st.sampled_from(peer_ref.ACTIVATIONS)),
        score=draw(st.sampled_from(peer_ref.SCORES)),
        expert_bias=draw(st.booleans()),
        expert_glu=draw(st.booleans()),
    )


@settings(max_examples=100, deadline=None)
@given(configs())
def test_to_dict_from_dict_round_trip(cfg):
    data = cfg.to_dict()
    assert set(data) == {
        "d_model",
        "n_experts",
        "heads",
        "topk",
        "d_key",
        "d_out",
        "shared_keys",
        "query_norm",
        "bn_momentum",
        "bn_eps",
        "query_bias",
        "activation",
        "score",
        "expert_bias",
        "expert_glu",
    }
    assert data["d_out"] is not None, "to_dict should store the resolved d_out"
    assert peer_ref.PEERConfig.from_dict(data) == cfg


def test_paper_defaults():
    # He 2024, §3: N = 1024², 8 heads, top-16, query batch norm, keys shared by every head.
    cfg = peer_ref.PEERConfig.paper(d_model=512)
    assert (cfg.n_experts, cfg.heads, cfg.topk, cfg.query_norm, cfg.shared_keys) == (1024**2, 8, 16, "batch", True)
    assert (cfg.d_model, cfg.d_out, cfg.d_key, cfg.score) == (512, 512, 128, "softmax")
    default = peer_ref.PEERConfig(d_model=512, n_experts=1024**2, heads=8, topk=16, d_key=128)
    assert cfg == default  # what the paper leaves open keeps SPEC §1's defaults


def test_paper_takes_overrides_and_validates_them():
    cfg = peer_ref.PEERConfig.paper(64, n_experts=32**2, d_key=32, expert_glu=True)
    assert (cfg.n_experts, cfg.d_key, cfg.expert_glu, cfg.heads, cfg.topk) == (32**2, 32, True, 8, 16)
    with pytest.raises(peer_ref.PEERConfigError, match=r"unknown field\(s\) \['n_head'\]"):
        peer_ref.PEERConfig.paper(64, n_head=4)
    with pytest.raises(peer_ref.PEERConfigError, match=r"PEERConfig.topk=16, but expected <= n_keys"):
        peer_ref.PEERConfig.paper(64, n_experts=8**2)


def test_docstring_documents_every_field():
    import dataclasses

    attributes = peer_ref.PEERConfig.__doc__.split("Attributes:", 1)[1].split("Raises:", 1)[0]
    documented = re.findall(r"^ {8}(\w+): ", attributes, re.M)
    assert documented == [f.name for f in dataclasses.fields(peer_ref.PEERConfig)]
