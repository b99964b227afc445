"""The experiments: isoFLOP in miniature, Table 2 in miniature, a trained layer across frameworks,
and the pool-size ablation in miniature with the lazy optimizer's cost in quality.

Each returns a JSON-ready dict; ``report`` turns it into Markdown and plots. Sizes live in
``SIZES`` ("default": the committed reproduction; "quick": a minute-scale check of the same code).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from peer_ref import TOLERANCES, metrics

from . import data
from .config import ModelConfig, TrainConfig
from .train import run

# Model and schedule of each size. Budgets are numbers of training steps; every variant of a
# budget trains on the same tokens, so equal FLOPs per token make equal training FLOPs.
SIZES = {
    "default": {
        "model": {"d_model": 64, "n_layers": 3, "n_heads": 4, "seq": 64},
        "train": {"batch": 16, "eval_batches": 16, "warmup": 20},
        "budgets": (300, 900),
        "seeds": (0, 1),
        "experts": (16**2, 32**2, 64**2),
        "usage_steps": 300,
        "transfer_steps": 300,
        # pool: N from 32² to 1024² at the default model's heads × top-k (8 × 8) and d_model,
        # trained sparse (SPEC §7.1); the lazy optimizer's cost measured at each N of lazy_experts
        # (a step lists most rows at 32², few at 128²).
        "pool_experts": (32**2, 64**2, 128**2, 256**2, 512**2, 1024**2),
        "pool_steps": 600,
        "lazy_experts": (32**2, 128**2),
    },
    "quick": {
        "model": {
            "d_model": 32,
            "n_layers": 3,
            "n_heads": 2,
            "seq": 32,
            "peer_heads": 4,
            "d_key": 16,
            "ffn_width": 128,
            "n_experts": 16**2,
        },
        "train": {"batch": 8, "eval_batches": 4, "warmup": 5},
        "budgets": (20, 40),
        "seeds": (0,),
        "experts": (8**2, 16**2),
        "usage_steps": 30,
        "transfer_steps": 20,
        "pool_experts": (8**2, 16**2),
        "pool_steps": 20,
        "lazy_experts": (8**2,),
    },
}

VARIANTS = {
    "dense": {"ffn": "dense"},
    "peer": {"ffn": "peer", "query_norm": "batch"},
    "peer_no_bn": {"ffn": "peer", "query_norm": "none"},
    "peer_glu": {"ffn": "peer_glu", "query_norm": "batch"},
}


def _configs(size: str, steps: int, seed: int, overrides: dict, **model) -> tuple[ModelConfig, TrainConfig]:
    spec = SIZES[size]
    model_cfg = ModelConfig(**{**spec["model"], **overrides.get("model", {}), **model})
    eval_every = max(1, steps // 5)
    train_cfg = TrainConfig(
        **{**spec["train"], **overrides.get("train", {}), "steps": steps, "seed": seed, "eval_every": eval_every}
    )
    return model_cfg, train_cfg


def _precision(overrides: dict) -> str:
    """The training precision of an experiment's runs (``TrainConfig.precision``)."""
    return overrides.get("train", {}).get("precision", TrainConfig.precision)


def _summary(record: dict) -> dict:
    """A run's record without the per-step losses (kept short for the JSON)."""
    keep = {k: v for k, v in record.items() if k not in ("losses", "engine")}
    keep["loss_first"], keep["loss_last"] = record["losses"][0], record["losses"][-1]
    keep["losses_every_10"] = record["losses"][::10]
    return keep


def isoflop(
    corpus: data.Corpus,
    size: str = "default",
    backend: str = "torch",
    device: str = "cpu",
    seeds=None,
    overrides: dict | None = None,
    progress=None,
) -> dict:
    """Dense FFN vs PEER vs PEER without query batch norm vs PEER with GLU experts, at equal FLOPs
    per token (``ModelConfig``'s "dense" and "peer_glu" stand-ins), at each budget."""
    spec, overrides = SIZES[size], overrides or {}
    seeds = spec["seeds"] if seeds is None else seeds
    runs = []
    for steps in spec["budgets"]:
        for seed in seeds:
            for variant, fields in VARIANTS.items():
                model_cfg, train_cfg = _configs(size, steps, seed, overrides, **fields)
                record = run(
                    model_cfg,
                    train_cfg,
                    corpus,
                    backend=backend,
                    device=device,
                    progress=progress,
                    label=f"{variant} {steps} steps seed {seed}",
                )
                runs.append({"variant": variant, "budget_steps": steps, "seed": seed, **_summary(record)})
    return {
        "experiment": "isoflop",
        "size": size,
        "backend": backend,
        "precision": _precision(overrides),
        "table": isoflop_table(runs),
        "runs": runs,
    }


def isoflop_table(runs: list[dict]) -> list[dict]:
    """One row per (budget, variant) of ``runs``: mean and sample std of the validation bpb over
    seeds, FLOPs, parameters, the PEER layer's top-k and routing metrics."""
    table = []
    for steps in sorted({r["budget_steps"] for r in runs}):
        for variant in [v for v in VARIANTS if any(r["variant"] == v for r in runs)]:
            group = [r for r in runs if r["variant"] == variant and r["budget_steps"] == steps]
            bpb = np.array([r["val_bpb"] for r in group])
            usage = [r["routing"][b]["usage"] for r in group for b in r["routing"]]
            unev = [r["routing"][b]["unevenness"] for r in group for b in r["routing"]]
            table.append(
                {
                    "variant": variant,
                    "budget_steps": steps,
                    "train_flops": group[0]["train_flops"],
                    "train_flops_per_token": group[0]["train_flops_per_token"],
                    "n_params": group[0]["n_params"],
                    "seeds": len(group),
                    "peer_topk": _built_topk(group[0]),
                    "val_bpb_mean": float(bpb.mean()),
                    "val_bpb_std": float(bpb.std(ddof=1)) if len(bpb) > 1 else None,
                    "val_bpb": bpb.tolist(),
                    "usage_mean": float(np.mean(usage)) if usage else None,
                    "unevenness_mean": float(np.mean(unev)) if unev else None,
                }
            )
    return table


def _built_topk(record: dict) -> int | None:
    """The top-k of the PEER layer a run built (None for the dense variant)."""
    cfg = ModelConfig(**record["model"])
    return cfg.peer_config().topk if cfg.ffn != "dense" else None


def usage(
    corpus: data.Corpus,
    size: str = "default",
    backend: str = "torch",
    device: str = "cpu",
    seed: int = 0,
    overrides: dict | None = None,
    progress=None,
) -> dict:
    """Expert usage and unevenness on validation data, with and without query batch norm, per N."""
    spec, overrides = SIZES[size], overrides or {}
    runs, table = [], []
    for n_experts in spec["experts"]:
        for query_norm in ("batch", "none"):
            model_cfg, train_cfg = _configs(
                size, spec["usage_steps"], seed, overrides, ffn="peer", query_norm=query_norm, n_experts=n_experts
            )
            record = run(
                model_cfg,
                train_cfg,
                corpus,
                backend=backend,
                device=device,
                progress=progress,
                label=f"N={n_experts} query_norm={query_norm}",
            )
            runs.append(_summary(record))
            for block, m in record["routing"].items():
                table.append(
                    {
                        "n_experts": n_experts,
                        "query_norm": query_norm,
                        "block": int(block),
                        "usage": m["usage"],
                        "unevenness": m["unevenness"],
                        "val_bpb": record["val_bpb"],
                    }
                )
    return {
        "experiment": "usage",
        "size": size,
        "backend": backend,
        "precision": _precision(overrides),
        "table": table,
        "runs": runs,
    }


def pool(
    corpus: data.Corpus,
    size: str = "default",
    backend: str = "torch",
    device: str = "cpu",
    seeds=None,
    overrides: dict | None = None,
    progress=None,
) -> dict:
    """The paper's pool-size ablation in miniature ("more experts at fixed h, k", PAPER.md §3):
    the PEER model at each N of ``pool_experts``, with the same heads, top-k, d_model and
    tokens, trained with row-sparse table gradients and the lazy optimizer (``TrainConfig.
    sparse``); validation bits per byte and expert usage per N and seed. Then the lazy
    optimizer's cost in quality: the same model at each N of ``lazy_experts`` (a subset of
    ``pool_experts``) trained dense (AdamW on every parameter), same seeds, against its sparse
    run."""
    spec, overrides = SIZES[size], overrides or {}
    seeds = spec["seeds"] if seeds is None else seeds
    runs = []
    steps = spec["pool_steps"]
    plan = [(n, True) for n in spec["pool_experts"]] + [(n, False) for n in spec["lazy_experts"]]
    for n_experts, sparse in plan:
        for seed in seeds:
            model_cfg, train_cfg = _configs(
                size,
                steps,
                seed,
                {**overrides, "train": {**overrides.get("train", {}), "sparse": sparse}},
                ffn="peer",
                n_experts=n_experts,
            )
            record = run(
                model_cfg,
                train_cfg,
                corpus,
                backend=backend,
                device=device,
                progress=progress,
                label=f"N={n_experts} {'sparse' if sparse else 'dense'} seed {seed}",
            )
            runs.append({"n_experts": n_experts, "sparse": sparse, "seed": seed, **_summary(record)})
    return {
        "experiment": "pool",
        "size": size,
        "backend": backend,
        "precision": _precision(overrides),
        "steps": steps,
        "table": pool_table([r for r in runs if r["sparse"]]),
        "lazy": [row for n in spec["lazy_experts"] for row in lazy_table(runs, n)],
        "runs": runs,
    }


def _mean_std(values) -> tuple[float, float | None]:
    values = np.asarray(values, dtype=float)
    return float(values.mean()), (float(values.std(ddof=1)) if values.size > 1 else None)


def pool_table(runs: list[dict]) -> list[dict]:
    """One row per N of ``runs``: validation bpb (mean, sample std over seeds, each seed's), the
    PEER block's usage and unevenness on validation data, FLOPs, parameters and speed."""
    table = []
    for n in sorted({r["n_experts"] for r in runs}):
        group = [r for r in runs if r["n_experts"] == n]
        bpb, bpb_std = _mean_std([r["val_bpb"] for r in group])
        table.append(
            {
                "n_experts": n,
                "seeds": len(group),
                "val_bpb_mean": bpb,
                "val_bpb_std": bpb_std,
                "val_bpb": [r["val_bpb"] for r in group],
                "usage_mean": float(np.mean([m["usage"] for r in group for m in r["routing"].values()])),
                "unevenness_mean": float(np.mean([m["unevenness"] for r in group for m in r["routing"].values()])),
                "n_params": group[0]["n_params"],
                "train_flops_per_token": group[0]["train_flops_per_token"],
                "peer_flops_per_token": ModelConfig(**group[0]["model"]).built_peer_flops(),
                "rows_listed": _rows_listed(group),
                "tokens": group[0]["completed_steps"] * group[0]["tokens_per_step"],
                "tokens_per_s_mean": float(np.mean([r["tokens_per_s"] for r in group])),
            }
        )
    return table


def _rows_listed(group: list[dict]) -> float | None:
    """Mean over runs and PEER blocks of the fraction of table rows a training step listed (SPEC
    §7.1), None for dense runs."""
    fractions = [f for r in group for f in (r.get("rows_listed") or {}).values()]
    return float(np.mean(fractions)) if fractions else None


def lazy_table(runs: list[dict], n_experts: int) -> list[dict]:
    """Dense AdamW against the sparse lazy optimizer at ``n_experts``: one row per optimizer
    (its record's "optimizer"), with the per-seed bpb and, on the sparse row, the mean over
    seeds of (sparse bpb − dense bpb) of the same seed."""
    rows = []
    by = {(r["sparse"], r["seed"]): r for r in runs if r["n_experts"] == n_experts}
    seeds = sorted(seed for sparse, seed in by if not sparse and (True, seed) in by)
    for sparse in (False, True):
        group = [by[sparse, seed] for seed in seeds]
        bpb, bpb_std = _mean_std([r["val_bpb"] for r in group])
        diffs = [by[True, seed]["val_bpb"] - by[False, seed]["val_bpb"] for seed in seeds]
        rows.append(
            {
                "n_experts": n_experts,
                "sparse": sparse,
                "optimizer": group[0]["optimizer"],
                "seeds": seeds,
                "val_bpb_mean": bpb,
                "val_bpb_std": bpb_std,
                "val_bpb": [r["val_bpb"] for r in group],
                "minus_dense_mean": float(np.mean(diffs)) if sparse else None,
                "rows_listed": _rows_listed(group),
                "usage_mean": float(np.mean([m["usage"] for r in group for m in r["routing"].values()])),
                "tokens_per_s_mean": float(np.mean([r["tokens_per_s"] for r in group])),
            }
        )
    return rows


_OTHER = r"""
import json, sys
import numpy as np
import peer_backends
from peer_ref import metrics
name, ckpt, inputs = sys.argv[1:4]
cfg, params, state = peer_backends.load(ckpt, backend=name)
be = peer_backends.get(name)
stored = np.load(inputs)
ys, totals, same = [], None, []
for i in range(int(stored["n"])):
    y, _, aux = be.apply(cfg, params, state, be.from_numpy(stored[f"x{i}"]), training=False)
    np.save(f"{inputs}.{name}.y{i}.npy", be.to_numpy(y))
    ind, w = be.to_numpy(aux["indices"]), be.to_numpy(aux["weights"])
    same.append(float(np.mean(ind == stored[f"i{i}"])))
    totals = metrics.accumulate(cfg, ind, w, into=totals)
print("RESULT " + json.dumps({"usage": metrics.usage(totals), "unevenness": metrics.unevenness(totals),
                               "indices_equal": float(np.mean(same)), "version": be.version}))
"""


def transfer(
    corpus: data.Corpus,
    size: str = "default",
    device: str = "cpu",
    seed: int = 0,
    targets=("jax", "tensorflow"),
    overrides: dict | None = None,
    progress=None,
    workdir=None,
) -> dict:
    """Train the torch model, record its PEER layer's inputs on validation batches, save the layer
    with ``peer_backends.save`` and load it into each target framework (a fresh process each);
    compare outputs with peer_ref's float32 tolerance and the usage metrics."""
    import peer_backends

    spec, overrides = SIZES[size], overrides or {}
    model_cfg, train_cfg = _configs(size, spec["transfer_steps"], seed, overrides, ffn="peer")
    record = run(
        model_cfg,
        train_cfg,
        corpus,
        backend="torch",
        device=device,
        progress=progress,
        label="torch model for transfer",
        keep_engine=True,
    )
    eng = record.pop("engine")
    block = model_cfg.replaced()[0]
    val = data.val_batches(corpus.val, train_cfg.batch, model_cfg.seq, train_cfg.eval_batches)
    seen = eng.peer_inputs(val, block)
    cfg = model_cfg.peer_config()
    tol = TOLERANCES["float32"]
    totals = None
    for _, _, ind, w in seen:
        totals = metrics.accumulate(cfg, ind, w, into=totals)
    source = {"usage": metrics.usage(totals), "unevenness": metrics.unevenness(totals)}
    results = {}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        ckpt, inputs = os.path.join(tmp, "peer.safetensors"), os.path.join(tmp, "inputs.npz")
        params, state = eng.peer_layer(block).params_and_state()
        peer_backends.save(ckpt, cfg, params, state)
        arrays = {"n": np.array(len(seen))}
        for i, (x, _, ind, _) in enumerate(seen):
            arrays[f"x{i}"], arrays[f"i{i}"] = x, ind
        np.savez(inputs, **arrays)
        for name in targets:
            proc = subprocess.run(
                [sys.executable, "-c", _OTHER, name, ckpt, inputs], capture_output=True, text=True, env=_child_env()
            )
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                raise RuntimeError(f"loading the layer into {name} failed: {proc.stderr.strip()[-2000:]}")
            out = json.loads(lines[-1][len("RESULT ") :])
            errs, ok = [], True
            for i, (_, y_torch, _, _) in enumerate(seen):
                y = np.load(f"{inputs}.{name}.y{i}.npy")
                scale = max(1.0, float(np.max(np.abs(y_torch))))
                err = np.abs(y - y_torch)
                ok &= bool(np.all(err <= tol.atol * scale + tol.rtol * np.abs(y_torch)))
                errs.append(float(np.max(err)))
            out.update(
                {
                    "max_abs_error": max(errs),
                    "outputs_within_tolerance": ok,
                    "usage_abs_diff": abs(out["usage"] - source["usage"]),
                    "unevenness_abs_diff": abs(out["unevenness"] - source["unevenness"]),
                }
            )
            results[name] = out
    return {
        "experiment": "transfer",
        "size": size,
        "precision": train_cfg.precision,
        "tolerance": tol._asdict(),
        "peer_config": cfg.to_dict(),
        "block": block,
        "tokens_compared": int(sum(x.shape[0] * x.shape[1] for x, *_ in seen)),
        "torch": source,
        "targets": results,
        "run": _summary(record),
    }


def _child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env
