"""peer_spec — the written spec (SPEC.md) and the golden vectors, shipped as package data.

import peer_spec
for path in peer_spec.vector_paths():
    vector = peer_spec.load_vector(path)   # a Vector NamedTuple; layout in vectors/README.md
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import numpy as np

FORMAT = "peer-vectors/1"


class Vector(NamedTuple):
    name: str
    config: dict
    training: bool
    x: np.ndarray
    mask: np.ndarray | None
    dy: np.ndarray
    params: dict
    state: dict
    y: np.ndarray
    new_state: dict
    aux: dict
    grads: dict
    dx: np.ndarray


def vector_paths() -> list[Path]:
    """Every golden vector file, sorted by name."""
    folder = resources.files(__name__).joinpath("vectors")
    return sorted(Path(str(folder)).glob("*.npz"))


def load_vector(path) -> Vector:
    with np.load(path, allow_pickle=False) as npz:
        data = {key: npz[key] for key in npz.files}
    if str(data["format"]) != FORMAT:
        raise ValueError(f"vector {path} has format={str(data['format'])!r}, but expected {FORMAT!r}")

    def tree(prefix: str) -> dict:
        return {key[len(prefix) + 1 :]: value for key, value in data.items() if key.startswith(prefix + "/")}

    return Vector(
        name=Path(path).stem,
        config=json.loads(str(data["config"])),
        training=bool(data["training"]),
        x=data["x"],
        mask=data.get("mask"),
        dy=data["dy"],
        params=tree("params"),
        state=tree("state"),
        y=data["y"],
        new_state=tree("new_state"),
        aux=tree("aux"),
        grads=tree("grads"),
        dx=data["dx"],
    )
