"""Regenerate the golden vectors spec/vectors/<name>.npz from peer_ref.

    python spec/make_vectors.py           # write every vector
    python spec/make_vectors.py --check   # regenerate in memory, compare bitwise, exit 1 on mismatch

Each case fixes a config, a seed and the call (training, mask, leading shape), so the files
depend on nothing but peer_ref and NumPy. The layout of a file is described in
spec/vectors/README.md. Files are written with fixed zip timestamps, so regenerating on the
same machine reproduces them byte for byte.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

import peer_ref

VECTORS = Path(__file__).resolve().parent / "vectors"
FORMAT = "peer-vectors/1"
# Random cases must keep every routing decision this far from a tie, so that another machine's
# rounding cannot flip an index (README.md promises it).
MIN_ROUTING_MARGIN = 1e-4


class VectorCase(NamedTuple):
    config: dict
    seed: int
    training: bool
    lead: tuple[int, ...]
    mask: bool = False  # a random mask with about a third of the tokens masked
    dtype: str = "float64"
    integer_valued: bool = False  # small integers everywhere: exact routing ties, exact in any summation order
    state_noise: bool = True  # move running statistics away from (0, 1) so evaluation tests them


BASE = dict(d_model=6, n_experts=16, heads=2, topk=3, d_key=4)

CASES: dict[str, VectorCase] = {
    "default_train_mask": VectorCase(BASE, 1, True, (2, 5), mask=True),
    "default_eval": VectorCase(BASE, 2, False, (7,)),
    "gelu_tanh_sigmoid_per_head": VectorCase(
        {**BASE, "activation": "gelu_tanh", "score": "sigmoid", "shared_keys": False}, 3, True, (6,)
    ),
    "relu_score_none_query_bias": VectorCase(
        {**BASE, "activation": "relu", "score": "none", "query_bias": True}, 4, True, (3, 2), mask=True
    ),
    "silu_no_norm_d_out": VectorCase(
        {**BASE, "activation": "silu", "query_norm": "none", "expert_bias": False, "d_out": 3}, 5, False, (5,)
    ),
    "identity_per_head_lead3": VectorCase(
        {**BASE, "activation": "identity", "shared_keys": False, "heads": 3, "query_bias": True, "d_out": 4},
        6,
        True,
        (2, 3, 2),
        mask=True,
    ),
    "single_token_eval": VectorCase({**BASE, "heads": 1, "topk": 1, "score": "sigmoid"}, 7, False, ()),
    "wide_per_head_momentum": VectorCase(
        {
            "d_model": 8,
            "n_experts": 64,
            "heads": 4,
            "topk": 4,
            "d_key": 6,
            "shared_keys": False,
            "bn_momentum": 0.3,
            "bn_eps": 1e-3,
            "d_out": 5,
        },
        8,
        True,
        (9,),
        mask=True,
    ),
    "float32_train_mask": VectorCase({**BASE, "query_bias": True}, 9, True, (4, 3), mask=True, dtype="float32"),
    "float32_eval_no_norm": VectorCase(
        {**BASE, "query_norm": "none", "score": "none", "activation": "relu"}, 10, False, (5,), dtype="float32"
    ),
    "exact_ties": VectorCase(
        {**BASE, "query_norm": "none", "activation": "identity", "score": "none"}, 11, False, (6,), integer_valued=True
    ),
    "zero_tokens_train": VectorCase(BASE, 12, True, (0,)),
    "glu_silu_train_mask": VectorCase({**BASE, "expert_glu": True, "activation": "silu"}, 13, True, (2, 4), mask=True),
    "glu_gelu_per_head_d_out_eval": VectorCase(
        {**BASE, "expert_glu": True, "shared_keys": False, "expert_bias": False, "score": "sigmoid", "d_out": 5},
        14,
        False,
        (6,),
    ),
    "glu_float32_no_norm": VectorCase(
        {**BASE, "expert_glu": True, "query_norm": "none", "activation": "relu", "query_bias": True},
        15,
        False,
        (5,),
        dtype="float32",
    ),
}


def _inputs(case: VectorCase):
    cfg = peer_ref.PEERConfig(**case.config)
    rng = np.random.default_rng(case.seed)
    params, state = peer_ref.init(cfg, seed=case.seed)
    if case.integer_valued:
        params = {k: rng.integers(-1, 2, v.shape).astype(np.float64) for k, v in params.items()}
        x = rng.integers(-2, 3, case.lead + (cfg.d_model,)).astype(np.float64)
    else:
        # Constants (scales, offsets, biases) start at 1 or 0; move them so their paths are tested.
        params = {
            k: v if k in peer_ref.init_std(cfg) else v + 0.2 * rng.standard_normal(v.shape) for k, v in params.items()
        }
        x = rng.standard_normal(case.lead + (cfg.d_model,))
    if case.state_noise:
        state = {k: np.abs(v + 0.3 * rng.standard_normal(v.shape)) for k, v in state.items()}
    dy = rng.standard_normal(case.lead + (cfg.d_out,))
    mask = rng.random(case.lead) < 0.67 if case.mask else None

    def cast(tree):
        return {k: v.astype(case.dtype) for k, v in tree.items()}

    return cfg, cast(params), cast(state), x.astype(case.dtype), dy.astype(case.dtype), mask


def config_json(cfg) -> str:
    """The config as JSON. ``expert_glu`` appears only when true: files written before the field
    existed stay byte-identical, and an absent field loads as its default (False)."""
    data = cfg.to_dict()
    if not data["expert_glu"]:
        del data["expert_glu"]
    return json.dumps(data, sort_keys=True)


def _routing_margin(cfg, params, state, x, training, mask) -> float:
    """Smallest gap between consecutive scores among the top topk+1 of all experts, over tokens and heads."""
    full = peer_ref.routing_scores(cfg, params, state, x, training, mask).astype(np.float64)
    ranked = -np.sort(-full, axis=-1)[..., : cfg.topk + 1]
    return float(np.min(-np.diff(ranked, axis=-1), initial=np.inf))


def build(case: VectorCase) -> dict[str, np.ndarray]:
    """Every array of one vector file, keyed as in spec/vectors/README.md."""
    cfg, params, state, x, dy, mask = _inputs(case)
    if not case.integer_valued:
        margin = _routing_margin(cfg, params, state, x, case.training, mask)
        if margin < MIN_ROUTING_MARGIN:
            raise ValueError(f"routing margin {margin:.3g} < {MIN_ROUTING_MARGIN}: pick another seed")
    y, new_state, aux = peer_ref.forward(cfg, params, state, x, case.training, mask)
    grads, dx = peer_ref.vjp(cfg, params, state, x, dy, case.training, mask)
    arrays = {
        "format": np.array(FORMAT),
        "config": np.array(config_json(cfg)),
        "training": np.array(case.training),
        "x": x,
        "dy": dy,
    }
    if mask is not None:
        arrays["mask"] = mask
    arrays.update({f"params/{k}": v for k, v in params.items()})
    arrays.update({f"state/{k}": v for k, v in state.items()})
    arrays["y"] = y
    arrays.update({f"new_state/{k}": v for k, v in new_state.items()})
    arrays.update({f"aux/{k}": v for k, v in aux.items()})
    arrays.update({f"grads/{k}": v for k, v in grads.items()})
    arrays["dx"] = dx
    return arrays


def encode(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz (readable by np.load) with a fixed timestamp and member order: reproducible bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key in sorted(arrays):
            member = io.BytesIO()
            # copy(order="C"), not ascontiguousarray, which would turn 0-d arrays into 1-d ones.
            np.lib.format.write_array(member, np.asarray(arrays[key]).copy(order="C"), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


def check() -> list[str]:
    """Names of vectors whose file differs from a fresh regeneration (or is missing / unexpected)."""
    problems = []
    expected = {f"{name}.npz" for name in CASES}
    for extra in sorted({p.name for p in VECTORS.glob("*.npz")} - expected):
        problems.append(f"{extra}: not produced by any case")
    for name, case in CASES.items():
        path = VECTORS / f"{name}.npz"
        if not path.exists():
            problems.append(f"{path.name}: missing")
            continue
        fresh = build(case)
        with np.load(path, allow_pickle=False) as stored:
            if sorted(stored.files) != sorted(fresh):
                problems.append(f"{path.name}: keys {sorted(stored.files)} != {sorted(fresh)}")
                continue
            for key, value in fresh.items():
                old = stored[key]
                if old.dtype != value.dtype or old.shape != value.shape or old.tobytes() != value.tobytes():
                    problems.append(f"{path.name}: {key} differs")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the stored files instead of writing")
    args = parser.parse_args(argv)
    if args.check:
        problems = check()
        for line in problems:
            print(line, file=sys.stderr)
        print(f"{len(CASES)} vectors, {len(problems)} mismatches")
        return 1 if problems else 0
    VECTORS.mkdir(exist_ok=True)
    for name, case in CASES.items():
        (VECTORS / f"{name}.npz").write_bytes(encode(build(case)))
    total = sum((VECTORS / f"{name}.npz").stat().st_size for name in CASES)
    print(f"wrote {len(CASES)} vectors to {VECTORS} ({total} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
