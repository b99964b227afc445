"""The tolerance table conformance uses for each dtype (SPEC §10.2).

A backend value ``a`` matches the reference value ``b`` when
``|a - b| <= atol * scale + rtol * |b|`` elementwise, where ``scale`` is
max(1, max|b|) over the compared array. ``route`` is the score margin below which two
experts count as tied for routing purposes (near-tie-aware routing, SPEC §4.3),
applied as ``route * max(1, max|scores|)``.
"""

from __future__ import annotations

from typing import NamedTuple


class Tolerance(NamedTuple):
    rtol: float
    atol: float
    grad_rtol: float
    grad_atol: float
    route: float


TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(rtol=1e-9, atol=1e-9, grad_rtol=1e-8, grad_atol=1e-8, route=1e-9),
    "float32": Tolerance(rtol=2e-4, atol=2e-4, grad_rtol=2e-3, grad_atol=2e-3, route=1e-4),
    "bfloat16": Tolerance(rtol=2e-2, atol=2e-2, grad_rtol=5e-2, grad_atol=5e-2, route=1e-2),
    # float16's unit roundoff 2^-11 is 8x finer than bfloat16's 2^-8: the bfloat16 row over 8, rounded up.
    "float16": Tolerance(rtol=3e-3, atol=3e-3, grad_rtol=7e-3, grad_atol=7e-3, route=2e-3),
}
# The mixed modes (float32 parameters, compute_dtype bfloat16 or float16) use their compute
# dtype's row (SPEC §10.2, §10.3).
