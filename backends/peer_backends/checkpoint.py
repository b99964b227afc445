"""Portable checkpoints: one safetensors file, canonical names, config in the metadata.

safetensors stores raw tensors and a JSON header, so loading a file never runs code.
A file whose names, shapes or dtypes do not fit its config is refused whole.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy

from peer_ref import checks
from peer_ref.config import PEERConfig
from peer_ref.errors import PEERCheckpointError, PEERConfigError, PEERInputError

from ._registry import get

FORMAT = "peer"
FORMAT_VERSION = "1"
# safetensors dtype codes -> the dtype names of SPEC §10
_NAMES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_FRAMEWORK_BACKEND = {
    "torch": "torch",
    "jax": "jax",
    "jaxlib": "jax",
    "tensorflow": "tensorflow",
    "keras": "tensorflow",
}


def _bfloat16():
    import ml_dtypes  # a dependency of this package; needed only for bfloat16 on the NumPy side

    return np.dtype(ml_dtypes.bfloat16)


def _to_numpy(value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    framework = type(value).__module__.split(".")[0]
    if framework in _FRAMEWORK_BACKEND and framework in sys.modules:
        return get(_FRAMEWORK_BACKEND[framework]).to_numpy(value)
    return np.asarray(value)


def _dtype_name(array: np.ndarray) -> str:
    return "bfloat16" if array.dtype.name == "bfloat16" else array.dtype.name


def save(path, cfg: PEERConfig, params: dict, state: dict) -> None:
    """Write ``params`` and ``state`` (any backend's arrays) and ``cfg`` to a safetensors file."""
    if not isinstance(cfg, PEERConfig):
        raise PEERInputError(f"cfg is {type(cfg).__name__}, but expected a PEERConfig")
    arrays = {name: _to_numpy(value) for name, value in {**params, **state}.items()}
    meta = {name: (a.shape, _dtype_name(a)) for name, a in arrays.items()}
    checks.check_params_state(cfg, {k: meta[k] for k in params}, {k: meta[k] for k in state})
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": json.dumps(cfg.to_dict())}
    contiguous = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
    safetensors.numpy.save_file(contiguous, str(Path(path)), metadata=metadata)


def _read(path) -> tuple[dict, dict[str, np.ndarray]]:
    raw = Path(path).read_bytes()  # a missing file raises FileNotFoundError as usual
    try:
        metadata = safetensors.safe_open(str(Path(path)), framework="numpy").metadata() or {}
        entries = safetensors.deserialize(raw)
    except Exception as err:  # safetensors raises its own error types for a malformed file
        raise PEERCheckpointError(f"checkpoint {str(path)!r} is not a readable safetensors file: {err}") from None
    arrays = {}
    for name, entry in entries:
        code = entry["dtype"].upper()
        if code not in _NAMES:
            raise PEERCheckpointError(
                f"checkpoint tensor {name!r} has dtype {code}, but expected one of {sorted(_NAMES)}"
            )
        dtype = _bfloat16() if code == "BF16" else np.dtype(_NAMES[code])
        arrays[name] = np.frombuffer(bytearray(entry["data"]), dtype=dtype).reshape(entry["shape"])
    return metadata, arrays


def load(path, backend: str | None = None):
    """Read a checkpoint into ``backend``'s native arrays: returns ``(cfg, params, state)``."""
    metadata, arrays = _read(path)
    if metadata.get("format") != FORMAT:
        raise PEERCheckpointError(
            f"checkpoint {str(path)!r} has metadata format={metadata.get('format')!r}, but expected {FORMAT!r}"
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        raise PEERCheckpointError(
            f"checkpoint format_version={metadata.get('format_version')!r}, but expected {FORMAT_VERSION!r}"
        )
    try:
        cfg = PEERConfig.from_dict(json.loads(metadata["config"]))
    except (KeyError, json.JSONDecodeError, TypeError, PEERConfigError) as err:
        raise PEERCheckpointError(f"checkpoint config is invalid: {err}") from None
    param_names, state_names = set(cfg.param_shapes()), set(cfg.state_shapes())
    params = {k: v for k, v in arrays.items() if k in param_names}
    state = {k: v for k, v in arrays.items() if k in state_names}
    extra = sorted(set(arrays) - param_names - state_names)
    if extra:
        raise PEERCheckpointError(f"checkpoint has tensors {extra} that config {cfg} does not define")
    try:
        checks.check_trees(cfg, params, state, lambda array: (array.shape, _dtype_name(array)))
    except PEERInputError as err:
        raise PEERCheckpointError(f"checkpoint does not fit its config: {err}") from None
    be = get(backend)
    return cfg, be.from_numpy(params), be.from_numpy(state)
