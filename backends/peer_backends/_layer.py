"""What the layers of every backend share: the seeding rule of SPEC §8 ("Layers") and its
checks. Without a seed a layer draws from its framework's random state; with ``seed=`` it
holds the reference's tables, ``peer_ref.init(cfg, seed)``, the same in every framework.
(The functional ``init(cfg, seed)`` of each backend draws with the framework's own generator;
its values differ across backends.)
"""

from __future__ import annotations

import numpy as np

import peer_ref
from peer_ref.errors import PEERConfigError


def check_seed(seed) -> int | None:
    """``seed`` when it is None or an int >= 0; PEERConfigError otherwise."""
    if seed is None or (isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and seed >= 0):
        return None if seed is None else int(seed)
    raise PEERConfigError(
        f"seed={seed!r}, but expected None (draw from the framework's random state) or an int >= 0 "
        "(the reference's tables, peer_ref.init(cfg, seed), identical in every framework)"
    )


def reference_tables(cfg, seed: int, dtype: str) -> tuple[dict, dict]:
    """``peer_ref.init(cfg, seed)`` as NumPy arrays for parameters of dtype ``dtype`` (a name):
    the float64 tables for float64, the float32 tables for the others (which the caller rounds
    to the 16-bit dtypes)."""
    return peer_ref.init(cfg, seed=seed, dtype="float64" if dtype == "float64" else "float32")
