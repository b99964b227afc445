"""What the layers of every backend share: the seeding rule and its checks (SPEC §8).

A layer draws its initial parameters the way its framework's own layers do: a torch module
from torch's default generator (``torch.manual_seed``), an NNX module from the ``rngs`` it
is given, a Keras layer from Keras's seeding (``keras.utils.set_random_seed``). So two layers
built one after the other differ, and seeding the framework makes a model reproducible.

An explicit ``seed=`` instead gives the reference's tables, ``peer_ref.init(cfg, seed)``,
drawn in float64 (float32 for parameters of 32 bits or fewer) and rounded once to the layer's
dtype: the same values in every framework, so layers built with one seed in torch, JAX and
Keras start identical. (The functional ``init(cfg, seed)`` of each backend draws with the
framework's own generator, as SPEC §8 describes; its values differ across backends.)
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
        "(the reference's tables, peer_ref.init(cfg, seed), identical in every framework)")


def reference_tables(cfg, seed: int, dtype: str) -> tuple[dict, dict]:
    """``peer_ref.init(cfg, seed)`` as NumPy arrays for parameters of dtype ``dtype`` (a name):
    float64 draws for float64, float32 draws (rounded once more by the caller) for the others."""
    return peer_ref.init(cfg, seed=seed, dtype="float64" if dtype == "float64" else "float32")


def table_summary(shapes: dict[str, tuple], dtypes: dict[str, str]) -> str:
    """``"experts.down: (256, 64) float32, ..."``: what a layer's repr shows of its tables."""
    return ", ".join(f"{name}: {tuple(shape)} {dtypes[name]}" for name, shape in shapes.items())
