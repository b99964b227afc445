"""Declared options: which config values and call features a backend supports.

A backend that implements only part of SPEC §1's configurations (an outside PEER with per-head
keys only, say) declares ``options``, a mapping from an option name below to the values it
supports; a name it leaves out supports every value. No ``options`` attribute means the full set,
which every built-in backend has. The conformance suite draws only supported configurations and
reports a rule that needs anything else as *not supported*, naming the option.

Options are config fields (their values as in ``PEERConfig``) and two derived widths, plus call
features; dtypes, gradients and the compiled path are capabilities (``contract.capabilities``).

    options = {"shared_keys": (False,), "query_norm": ("none",), "expert_bias": (False,)}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from peer_ref import ACTIVATIONS, QUERY_NORMS, SCORES, PEERConfig
from peer_ref.errors import PEERConfigError

# Every option with every value SPEC §1 allows, the preferred (default) value first.
OPTIONS: dict[str, tuple] = {
    "shared_keys": (True, False),
    "query_norm": QUERY_NORMS,
    "query_bias": (False, True),
    "activation": ACTIVATIONS,
    "score": SCORES,
    "expert_bias": (True, False),
    "expert_glu": (False, True),
    "d_out": ("d_model", "other"),  # d_out equal to d_model, or another width
    "d_model": ("even", "odd"),  # parity of the input width
    "mask": (False, True),  # calls with mask= (SPEC §5)
    "routing": (False, True),  # calls with routing= (SPEC §4.4)
}
FULL: dict[str, tuple] = dict(OPTIONS)


def supported(backend) -> dict[str, tuple]:
    """Every option with the values ``backend`` supports (its ``options`` over the full set).

    Raises PEERConfigError for an unknown option name or value, or an option left with no value."""
    declared = getattr(backend, "options", None) or {}
    if not isinstance(declared, Mapping):
        raise PEERConfigError(f"options={declared!r}, but expected a mapping of option name to supported values")
    table = dict(FULL)
    for name, values in declared.items():
        if name not in OPTIONS:
            raise PEERConfigError(f"options[{name!r}]: unknown option; expected one of {sorted(OPTIONS)}")
        values = tuple(values)
        unknown = [v for v in values if v not in OPTIONS[name]]
        if unknown or not values:
            raise PEERConfigError(f"options[{name!r}]={values!r}, but expected a non-empty subset of {OPTIONS[name]!r}")
        table[name] = tuple(v for v in OPTIONS[name] if v in values)
    return table


def needed(cfg: PEERConfig | None = None, **features) -> dict[str, object]:
    """The option values a config (and the call features given, e.g. ``mask=True``) needs."""
    values = {name: value for name, value in features.items() if name in OPTIONS}
    if cfg is not None:
        for name in ("shared_keys", "query_norm", "query_bias", "activation", "score", "expert_bias", "expert_glu"):
            values[name] = getattr(cfg, name)
        values["d_out"] = "d_model" if cfg.d_out == cfg.d_model else "other"
        values["d_model"] = "odd" if cfg.d_model % 2 else "even"
    return values


def unsupported(table: Mapping[str, tuple], cfg: PEERConfig | None = None, **features) -> dict[str, object]:
    """The option values of ``needed(cfg, **features)`` that ``table`` (see ``supported``) lacks."""
    return {name: value for name, value in needed(cfg, **features).items() if value not in table[name]}


def describe(values: Mapping[str, object]) -> str:
    """``{"query_norm": "batch"}`` as ``query_norm='batch'``, the form the suite reports."""
    return ", ".join(f"{name}={value!r}" for name, value in values.items())


def project(cfg: PEERConfig, table: Mapping[str, tuple]) -> PEERConfig:
    """The supported config nearest to ``cfg``: each unsupported option set to a supported value
    (the first in ``OPTIONS`` order), a width of the wrong kind changed by one; sizes, heads and
    top-k kept."""
    missing = unsupported(table, cfg)
    fields = {name: table[name][0] for name in missing if name not in ("d_model", "d_out")}
    d_model = cfg.d_model + 1 if "d_model" in missing else cfg.d_model
    equal = cfg.d_out == cfg.d_model if "d_out" not in missing else "d_model" in table["d_out"]
    d_out = d_model if equal else cfg.d_out
    if d_out == d_model and not equal:
        d_out += 1
    return dataclasses.replace(cfg, d_model=d_model, d_out=d_out, **fields)
