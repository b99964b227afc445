"""The ``implementation=`` keyword shared by every backend's apply, vjp and layer.

An implementation names the kernels that run the expert stage (SPEC §3.10-§3.11) and its
backward; every implementation of a backend computes the same function (the conformance suite
runs against each: ``--peer-implementation NAME``). In the style of
``jax.nn.dot_product_attention(implementation=...)``: None picks the best one available for the
device, a name forces one, and a name that cannot run here raises an error that says why and
what can.
"""

from __future__ import annotations

from collections.abc import Mapping

from peer_ref.errors import PEERConfigError


def check_known(backend: str, implementation: object, names, usable: list[str] | None = None) -> None:
    """Raise PEERConfigError unless ``implementation`` is None or one of ``names``, the backend's
    implementations (whether it can run here is ``choose``'s question); ``usable``, where given,
    is named in the message as what can run here."""
    if implementation is None or (isinstance(implementation, str) and implementation in names):
        return
    here = "" if usable is None else f"; available here: {usable}"
    raise PEERConfigError(
        f"implementation={implementation!r}, but backend {backend!r} has {sorted(names)} "
        f"(or None for the best available{here})"
    )


def choose(backend: str, implementation: object, options: Mapping[str, str | None], preferred: list[str]) -> str:
    """The implementation to run.

    backend: the backend's name (for messages). implementation: the caller's choice, None or a
    name. options: every name the backend knows, mapped to None where it can run here and to the
    reason where it cannot. preferred: names in order of preference for ``implementation=None``;
    the first that can run is chosen.

    Raises PEERConfigError for a name the backend does not know, or one that cannot run here.
    """
    usable = [name for name, reason in options.items() if reason is None]
    if implementation is None:
        for name in preferred:
            if options.get(name, "unknown") is None:
                return name
        raise PEERConfigError(f"backend {backend!r} has no implementation that can run here: {dict(options)}")
    check_known(backend, implementation, options, usable)
    reason = options[implementation]
    if reason is not None:
        raise PEERConfigError(
            f"implementation={implementation!r} is not available here: {reason}; available here: {usable}"
        )
    return implementation
