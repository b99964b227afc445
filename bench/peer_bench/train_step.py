"""`python -m peer_bench --train-step`: whole training steps (forward, backward, optimizer step)
over the number of experts, with the peak memory a step allocates.

Rows (each in a worker process of its own, one per number of experts N):

* ``PEER torch, dense grads + AdamW``: the torch layer (``peer_backends.torch.PEER``) in training
  mode, its dense gradients stepped by ``torch.optim.AdamW`` over every parameter.
* ``PEER torch, sparse grads + SparseAdam``: the layer built with ``sparse=True`` (SPEC §7.1): the
  expert tables' gradients are coalesced sparse COO tensors, stepped by ``torch.optim.SparseAdam``
  (lazy: only the rows listed), the routing parameters by ``torch.optim.AdamW``.
* ``PEER-pytorch + AdamW``: PEER-pytorch 0.2.2 mapped onto the case (``peer_pytorch.mapping``).
* ``dense FFN torch + AdamW``: the FFN of equal forward FLOPs per token (``formulas.dense_width``).
* ``PEER jax, dense grads + optax.adamw``: ``peer_backends.jax.vjp`` and ``optax.adamw`` in two
  jitted functions, the update donating the parameters and the optimizer state.
* ``PEER jax, sparse rows + optax.adam``: the table gradients as (rows, values) (SPEC §7.1) and
  ``optax.adam`` applied to those rows only, with donated buffers; the routing parameters by
  ``optax.adamw``.

A step is ``y = layer(x)``, ``y.backward(dy)`` (the gradient of ``sum(y * dy)``; dy is fixed
random data, as in the forward+backward rows), then the optimizer step and the gradients
cleared (``zero_grad``, which frees them). Each row times ``Preset.train_timing``: warm-up steps
(the first one allocates the optimizer state), then timed steps; the step time and its two
phases (forward+backward, optimizer) are medians over the timed steps. Peak step memory is the
high-water mark of the process during the timed steps above its level just before them, which
already holds the parameters, the optimizer state and the inputs: what a step allocates on top
of them (gradients, activations, optimizer temporaries). It is compared with the bytes of one
(N, d_model) table, ``table_bytes``: a step that writes a dense table gradient allocates at
least that much.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import time

import numpy as np

from .presets import DTYPE_BYTES, BenchCase, Timing, sweep_cases

SCHEMA = "peer_bench/train-step/1"
MODE = "train_step"
LEARNING_RATE = 1e-3
# (impl, framework, grads): every row kind, in the order of the report.
ROWS = (
    ("peer", "torch", "dense"),
    ("peer", "torch", "sparse"),
    ("peer_pytorch", "torch", "dense"),
    ("dense", "torch", "dense"),
    ("peer", "jax", "dense"),
    ("peer", "jax", "sparse"),
)
OPTIMIZERS = {
    ("torch", "dense"): "torch.optim.AdamW(lr=1e-3) over every parameter (defaults: betas (0.9, 0.999), "
    "weight_decay 0.01)",
    ("torch", "sparse"): "torch.optim.SparseAdam(lr=1e-3) over the expert tables (lazy: only the rows "
    "listed in the gradient), torch.optim.AdamW(lr=1e-3) over the routing parameters",
    ("jax", "dense"): "optax.adamw(1e-3) over every parameter",
    ("jax", "sparse"): "optax.adam(1e-3) applied to the rows listed in each table gradient (lazy), "
    "optax.adamw(1e-3) over the routing parameters",
}


def label(row: dict) -> str:
    if row["impl"] == "peer_pytorch":
        return "PEER-pytorch + AdamW"
    if row["impl"] == "dense":
        return f"dense FFN {row['backend']} + AdamW"
    framework = row["backend"].partition(":")[0]
    optimizer = {
        ("torch", "dense"): "dense grads + AdamW",
        ("torch", "sparse"): "sparse grads + SparseAdam",
        ("jax", "dense"): "dense grads + optax.adamw",
        ("jax", "sparse"): "sparse rows + optax.adam",
    }[framework, row["grads"]]
    return f"PEER {row['backend']}, {optimizer}"


def table_bytes(case: dict) -> int:
    """Bytes of one (N, d_model) expert table in the parameters' dtype."""
    return case["n_experts"] * case["d_model"] * DTYPE_BYTES[case["dtype"]]


# ---------------------------------------------------------------------------- worker side


@dataclasses.dataclass
class Step:
    """One training step in two phases, and what the gradients of the expert tables hold."""

    forward_backward: object  # () -> anything to block on
    optimizer_step: object  # () -> anything to block on
    grad_info: object  # () -> dict, called between the two phases


def measure(step: Step, fw, timing: Timing, meter) -> dict:
    """Warm-up steps, then timed steps (see Timing); the peak is over the timed steps only,
    above the level just before them (parameters and optimizer state already allocated)."""
    gc.collect()
    start = time.perf_counter()
    fw.block(step.forward_backward())
    info = step.grad_info()
    fw.block(step.optimizer_step())
    first_step_s = time.perf_counter() - start
    for _ in range(timing.warmup - 1):
        fw.block(step.forward_backward())
        fw.block(step.optimizer_step())
    gc.collect()
    base = meter.reset()
    steps, phases, peaks = [], [], [0, 0]
    while len(steps) < timing.repeats:
        start = time.perf_counter()
        fw.block(step.forward_backward())
        middle = time.perf_counter()
        if meter.resets:  # the mark of each phase on its own (the optimizer's starts with the gradients)
            peaks[0] = max(peaks[0], meter.peak())
            meter.reset()
        fw.block(step.optimizer_step())
        end = time.perf_counter()
        steps.append(end - start)
        phases.append((middle - start, end - middle))
        if meter.resets:
            peaks[1] = max(peaks[1], meter.peak())
            meter.reset()
        if len(steps) >= timing.min_repeats and sum(steps) >= timing.budget_s:
            break
    peak = max(peaks) if meter.resets else meter.peak()
    q1, median, q3 = np.percentile(steps, [25, 50, 75])
    return {
        "times_s": steps,
        "median_s": float(median),
        "q1_s": float(q1),
        "q3_s": float(q3),
        "repeats": len(steps),
        "first_step_s": first_step_s,
        "forward_backward_median_s": float(np.median([p[0] for p in phases])),
        "optimizer_median_s": float(np.median([p[1] for p in phases])),
        "resident_bytes_before": base,
        # With a mark that cannot be reset (ru_maxrss) this is only an upper bound.
        "peak_step_bytes": max(0, peak - base),
        "peak_forward_backward_bytes": max(0, peaks[0] - base) if meter.resets else None,
        "peak_optimizer_bytes": max(0, peaks[1] - base) if meter.resets else None,
        "mem_method": meter.method if meter.resets else meter.method + " (not reset: includes set-up)",
        **info,
    }


def _torch_grad_info(torch, named_tables) -> dict:
    layouts, total, rows = set(), 0, None
    for name, param in named_tables:
        grad = param.grad
        if grad is None:
            continue
        if grad.is_sparse:
            layouts.add("sparse_coo" + ("" if grad.is_coalesced() else " (uncoalesced)"))
            total += grad._indices().nbytes + grad._values().nbytes
            if name == "experts.down":
                rows = int(grad._nnz())
        else:
            layouts.add(str(grad.layout).removeprefix("torch."))
            total += grad.nbytes
    return {"table_grad_layout": ",".join(sorted(layouts)) or None, "table_grad_bytes": total, "grad_rows": rows}


def torch_step(job: dict, case: BenchCase, fw, x, dy) -> Step:
    """The torch rows: PEER (dense or sparse gradients), PEER-pytorch, the dense FFN."""
    import peer_ref

    torch = fw.torch
    torch.manual_seed(job["seed"])
    dtype = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}[case.dtype]
    sparse = job["grads"] == "sparse"
    if job["impl"] == "peer":
        from peer_backends.torch import PEER
        from peer_ref.config import PEERConfig

        implementation = job["backend"].partition(":")[2] or None
        extra = {"sparse": True} if sparse else {}
        model = PEER(
            PEERConfig(**case.config()), dtype=case.dtype, device=fw.device, implementation=implementation, **extra
        )
        tables = {name for name, _ in model.named_parameters() if name in peer_ref.EXPERT_TABLES}
    elif job["impl"] == "peer_pytorch":
        from . import peer_pytorch

        model = peer_pytorch.module(case, fw, job["seed"])
        x, dy = x[None], dy[None]  # it takes (batch, sequence, dim)
        tables = {name for name, p in model.named_parameters() if p.shape[0] == case.n_experts}
    else:
        from .worker import _dense_params

        weights = _dense_params(case, job["seed"])
        model = _torch_ffn(torch, {k: fw.put(v) for k, v in weights.items()})
        tables = set()
    model = model.to(device=fw.device, dtype=dtype)
    model.train()
    named = dict(model.named_parameters())
    if sparse:
        optimizers = [
            torch.optim.SparseAdam([named[n] for n in named if n in tables], lr=LEARNING_RATE),
            torch.optim.AdamW([named[n] for n in named if n not in tables], lr=LEARNING_RATE),
        ]
    else:
        optimizers = [torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)]

    def forward_backward():
        model(x).backward(dy)

    def optimizer_step():
        for optimizer in optimizers:
            optimizer.step()
        for optimizer in optimizers:
            optimizer.zero_grad()  # set_to_none: the gradients are freed

    return Step(forward_backward, optimizer_step, lambda: _torch_grad_info(torch, [(n, named[n]) for n in tables]))


def _torch_ffn(torch, weights):
    """gelu(x @ w1 + b1) @ w2 + b2 as an nn.Module holding ``weights`` (the FFN of equal FLOPs)."""

    class FFN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, value in weights.items():
                self.register_parameter(name, torch.nn.Parameter(value.clone()))

        def forward(self, x):
            return torch.nn.functional.gelu(x @ self.w1 + self.b1) @ self.w2 + self.b2

    return FFN()


def jax_step(job: dict, case: BenchCase, fw, backend, x, dy) -> Step:
    """The JAX rows: ``vjp`` in one jitted function, then the optax updates donating the
    parameters and the optimizer state: ``optax.adamw`` over every parameter (dense gradients),
    or ``apply_row_updates`` with ``optax.adam`` on the tables' listed rows and ``optax.adamw``
    over the routing parameters (sparse gradients, SPEC §7.1)."""
    import jax
    import optax

    import peer_ref
    from peer_ref.config import PEERConfig

    cfg = PEERConfig(**case.config())
    params, state = backend.init(cfg, seed=job["seed"], dtype=case.dtype)
    params, state = fw.to_device(params), fw.to_device(state)
    implementation = job["backend"].partition(":")[2] or None
    extra = {} if implementation is None else {"implementation": implementation}
    tables = [n for n in peer_ref.EXPERT_TABLES if n in params]
    if job["grads"] == "dense":
        groups = {"all": (optax.adamw(LEARNING_RATE), list(params))}
    else:
        rest = [n for n in params if n not in tables]
        groups = {"tables": (optax.adam(LEARNING_RATE), tables), "rest": (optax.adamw(LEARNING_RATE), rest)}
    sparse = job["grads"] == "sparse"
    extra |= {"sparse": True} if sparse else {}
    box = {
        group: [{n: params[n] for n in names}, fw.to_device(tx.init({n: params[n] for n in names}))]
        for group, (tx, names) in groups.items()
    }

    def grads_of(trees, x, dy):
        merged = {n: v for tree in trees for n, v in tree.items()}
        return backend.vjp(cfg, merged, state, x, dy, training=True, **extra)[0]

    def dense_update(tx):
        def update(params, opt_state, grads):
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        # Parameters and optimizer state are donated: the update writes them in place.
        return jax.jit(update, donate_argnums=(0, 1))

    grad_fn = jax.jit(grads_of)
    updates = {group: dense_update(tx) for group, (tx, _) in groups.items() if group != "tables"}

    def forward_backward():
        box["grads"] = grad_fn([box[g][0] for g in groups], x, dy)
        return box["grads"]

    def optimizer_step():
        grads = box.pop("grads")
        for group, (tx, names) in groups.items():
            params, opt_state = box[group]
            mine = {n: grads[n] for n in names}
            if group == "tables":  # optax on the listed rows only, tables and state donated (SPEC §7.1)
                box[group] = list(backend.apply_row_updates(tx, params, opt_state, mine))
            else:
                box[group] = list(updates[group](params, opt_state, mine))
        return [box[g][0] for g in groups]

    def info():
        grads = [box["grads"][n] for n in tables]
        if not sparse:
            return {
                "table_grad_layout": "dense",
                "table_grad_bytes": int(sum(g.nbytes for g in grads)),
                "grad_rows": None,
            }
        down = box["grads"]["experts.down"]
        return {
            "table_grad_layout": f"rows, values (padded to {down.rows.shape[0]} rows)",
            "table_grad_bytes": int(sum(g.rows.nbytes + g.values.nbytes for g in grads)),
            "grad_rows": int(down.count),
        }

    return Step(forward_backward, optimizer_step, info)


def run_job(job: dict, fw, backend, meter) -> list[dict]:
    """The worker's "train_step" job: one row per case (one case per job)."""
    import traceback

    from .worker import _inputs, _row

    rows = []
    for case_dict in job["cases"]:
        case = BenchCase.from_dict(case_dict)
        try:
            x_np, dy_np = _inputs(case, job["seed"])
            x, dy = fw.put(x_np), fw.put(dy_np)
            if job["framework"] == "torch":
                step = torch_step(job, case, fw, x, dy)
            else:
                step = jax_step(job, case, fw, backend, x, dy)
            stats = measure(step, fw, Timing(**job["timing"]), meter)
        except Exception as err:  # one failing row must not stop the others
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            rows.append(
                _row(
                    job,
                    case,
                    job["impl"],
                    MODE,
                    grads=job["grads"],
                    status="error",
                    reason=reason,
                    traceback=traceback.format_exc(limit=6),
                )
            )
            continue
        rows.append(
            _row(
                job,
                case,
                job["impl"],
                MODE,
                grads=job["grads"],
                optimizer=OPTIMIZERS[job["framework"], job["grads"]],
                status="ok",
                **stats,
                table_bytes=table_bytes(case_dict),
                tokens_per_s=case.tokens / stats["median_s"],
            )
        )
    return rows


# ---------------------------------------------------------------------------- parent side


def planned(settings) -> list[tuple[str, str, str, BenchCase]]:
    """(impl, backend, grads, case) of every row to run: each row kind whose framework is among
    --backends (torch and its FFN for "torch" or "torch:IMPL", PEER-pytorch for "peer_pytorch",
    jax for "jax" or "jax:IMPL"), over the experts sweep (or the case alone)."""
    axes = {"experts": settings.sweep_axes["experts"]} if "experts" in settings.sweep_axes else {}
    cases = sorted((c for c, _ in sweep_cases(settings.case, axes)), key=lambda c: c.n_experts) or [settings.case]
    plan = []
    for case in cases:
        for impl, framework, grads in ROWS:
            if impl == "peer_pytorch":
                names = ["torch"] if "peer_pytorch" in settings.backends else []
            else:
                names = [b for b in settings.backends if b.partition(":")[0] == framework]
                if impl == "dense":  # one FFN per framework
                    names = [framework] if names else []
            plan.extend((impl, name, grads, case) for name in names)
    return plan


def run(settings, progress=None) -> tuple[list[dict], list[dict], dict]:
    """Run every planned row in a worker of its own; returns (rows, job walls, frameworks)."""
    from .runner import Runner, _unavailable

    runner = Runner(settings, progress)
    plan = planned(settings)
    if progress is not None:
        runner.task = progress.add_task("train steps", total=len(plan))
    rows = []
    for impl, backend, grads, case in plan:
        runner._show(f"{label({'impl': impl, 'backend': backend, 'grads': grads})} N={case.n_experts}")
        blocked = _unavailable("peer_pytorch" if impl == "peer_pytorch" else backend)
        framework = "torch" if impl == "peer_pytorch" else backend.partition(":")[0]
        if blocked is None:
            job = runner._job(
                "train_step",
                impl,
                backend,
                "eager" if framework == "torch" else "compiled",
                MODE,
                [case],
                grads=grads,
                timing=dataclasses.asdict(settings.train_timing),
            )
            result = runner._run(job)
            if "framework" in result:
                info = runner.frameworks.setdefault(framework if impl == "dense" else backend, {})
                info.update({k: result[k] for k in ("framework", "backend_version", "capabilities") if k in result})
            if "rows" in result:
                rows.extend(result["rows"])
                runner._advance()
                continue
            status = "skipped" if "skipped" in result else "error"
            blocked = result.get(status, "no result")
        else:
            status = "skipped"
        rows.append(
            {
                "impl": impl,
                "backend": backend,
                "path": "eager" if framework == "torch" else "compiled",
                "mode": MODE,
                "grads": grads,
                "case": case.to_dict(),
                "status": status,
                "reason": blocked,
            }
        )
        runner._advance()
    return rows, runner.job_walls, runner.frameworks


def _find(rows, impl, framework, grads, n):
    for row in rows:
        same = (row["impl"], row["backend"].partition(":")[0], row["grads"]) == (impl, framework, grads)
        if same and row["case"]["n_experts"] == n and row.get("status") == "ok":
            return row
    return None


def add_ratios(rows: list[dict]) -> None:
    """Per row: its step time over the dense-gradient PEER row of its framework, over
    PEER-pytorch's (same N), and its peak step memory over one (N, d_model) table's bytes."""
    for row in rows:
        if row.get("status") != "ok":
            continue
        n, framework = row["case"]["n_experts"], row["backend"].partition(":")[0]
        row["peak_over_table"] = row["peak_step_bytes"] / row["table_bytes"]
        if row["impl"] == "peer":
            dense = _find(rows, "peer", framework, "dense", n)
            if dense is not None and dense is not row:
                row["ratio_vs_dense_grads"] = row["median_s"] / dense["median_s"]
            baseline = _find(rows, "peer_pytorch", "torch", "dense", n)
            if baseline is not None:
                row["ratio_vs_peer_pytorch"] = row["median_s"] / baseline["median_s"]


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets for each sparse row kind, at the largest and smallest N measured:
    step time ≤ 1/3 of the dense-gradient step and of PEER-pytorch's at the largest N, the largest
    N's step ≤ 5× the smallest N's, no (N, d_model) gradient buffer: the table gradients together
    smaller than one table, and the peak step memory below one table."""
    out = []
    for framework in ("torch", "jax"):
        sparse = [
            r
            for r in rows
            if r.get("status") == "ok"
            and r["impl"] == "peer"
            and r["grads"] == "sparse"
            and r["backend"].partition(":")[0] == framework
        ]
        if not sparse:
            continue
        large = max(sparse, key=lambda r: r["case"]["n_experts"])
        small = min(sparse, key=lambda r: r["case"]["n_experts"])
        n = large["case"]["n_experts"]
        checks = []
        dense = _find(rows, "peer", framework, "dense", n)
        if dense is not None:
            checks.append(("step time / dense-gradient step", large["median_s"] / dense["median_s"], "≤ 1/3", 1 / 3))
        baseline = _find(rows, "peer_pytorch", "torch", "dense", n)
        if baseline is not None:
            checks.append(("step time / PEER-pytorch step", large["median_s"] / baseline["median_s"], "≤ 1/3", 1 / 3))
        if small is not large:
            checks.append(
                (
                    f"step time at N = {_n(n)} / at N = {_n(small['case']['n_experts'])}",
                    large["median_s"] / small["median_s"],
                    "≤ 5",
                    5.0,
                )
            )
        checks.append(
            (
                "bytes of the table gradients / bytes of one (N, d_model) table",
                large["table_grad_bytes"] / large["table_bytes"],
                "< 1",
                1.0 - 1e-12,
            )
        )
        checks.append(
            ("peak step memory / bytes of one (N, d_model) table", large["peak_over_table"], "< 1", 1.0 - 1e-12)
        )
        for what, value, target, bound in checks:
            out.append(
                {
                    "row": label(large),
                    "n_experts": n,
                    "what": what,
                    "value": value,
                    "target": target,
                    "met": bool(value <= bound),
                }
            )
    return out


def _n(n: int) -> str:
    root = math.isqrt(n)
    return f"{root}²" if root * root == n else str(n)


def _fmt(value, spec, scale=1.0):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return format(value * scale, spec)


def markdown(report: dict) -> str:
    """The training-step table (one line per row and N) and the targets, from a train_step.json."""
    case, env, settings = report["case"], report["environment"], report["settings"]
    lines = [
        f"Training step (forward, backward, optimizer step) of the `{settings['preset']}` preset's layer: "
        f"d_model {case['d_model']}, heads {case['heads']}, top-{case['topk']}, d_key {case['d_key']}, "
        f"{case['tokens']} tokens, {case['dtype']}, training mode; {settings['threads']} threads on "
        f"{env['cpu_model']}, {env.get('date', '')}; load average before/after "
        f"{env.get('load_average_before')}/{env.get('load_average_after')}. "
        f"Command: `{env['command']}`.",
        "",
        "| N | implementation | step ms | fwd+bwd ms | optimizer ms | peak step MiB (fwd+bwd / optimizer) | "
        "peak / (N·d_model) table | table grads MiB | rows with a gradient | "
        "t / t(dense grads) | t / t(PEER-pytorch) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        n = _n(row["case"]["n_experts"])
        if row.get("status") != "ok":
            lines.append(f"| {n} | {label(row)} | {row.get('status')}: {row.get('reason')} |" + " |" * 8)
            continue
        rows_touched = row.get("grad_rows")
        touched = "–" if rows_touched is None else f"{rows_touched:,} ({rows_touched / row['case']['n_experts']:.0%})"
        lines.append(
            f"| {n} | {label(row)} | {_fmt(row['median_s'], '.0f', 1e3)} | "
            f"{_fmt(row['forward_backward_median_s'], '.0f', 1e3)} | {_fmt(row['optimizer_median_s'], '.0f', 1e3)} | "
            f"{_fmt(row['peak_step_bytes'], '.0f', 2**-20)} ({_fmt(row.get('peak_forward_backward_bytes'), '.0f', 2**-20)}"
            f" / {_fmt(row.get('peak_optimizer_bytes'), '.0f', 2**-20)}) | {_fmt(row.get('peak_over_table'), '.2f')} | "
            f"{_fmt(row.get('table_grad_bytes'), '.3g', 2**-20)} | {touched} | "
            f"{_fmt(row.get('ratio_vs_dense_grads'), '.2f')} | {_fmt(row.get('ratio_vs_peer_pytorch'), '.2f')} |"
        )
    lines += [
        "",
        "Times are medians over the timed steps; ratios are time ratios (below 1 = faster). Peak step "
        "MiB: the resident-memory high-water mark during the timed steps above the level just before "
        "them (parameters, optimizer state and inputs already resident), over the whole step (over "
        "forward+backward / over the optimizer step, which starts with the gradients resident). One "
        "(N, d_model) table holds N·d_model·itemsize bytes; a step that writes dense gradients of the "
        "tables allocates at least two of them (experts.down and experts.up). Table grads: the bytes "
        "of the expert tables' gradients after backward (a sparse COO gradient: its indices and "
        "values); rows with a gradient: the rows listed in experts.down's sparse gradient, and "
        "their share of N.",
    ]
    if report.get("targets"):
        lines += ["", "| target | row | N | measured | target | met |", "|---|---|---|---:|---|---|"]
        for t in report["targets"]:
            lines.append(
                f"| {t['what']} | {t['row']} | {_n(t['n_experts'])} | {t['value']:.2f} | {t['target']} | "
                f"{'yes' if t['met'] else '**no**'} |"
            )
    return "\n".join(lines) + "\n"


def rows_markdown(report: dict, framework: str) -> str:
    """The step times of one framework's layer rows (dense and sparse gradients) at every N of a
    train_step.json, with the sparse step's time over the dense one's."""
    lines = ["| N | step | step ms | fwd+bwd ms | optimizer ms | t / t(dense grads) |", "|---|---|---:|---:|---:|---:|"]
    for row in report["rows"]:
        if row.get("impl") != "peer" or row["backend"].partition(":")[0] != framework or row.get("status") != "ok":
            continue
        lines.append(
            f"| {_n(row['case']['n_experts'])} | {label(row)} | {_fmt(row['median_s'], '.0f', 1e3)} | "
            f"{_fmt(row['forward_backward_median_s'], '.0f', 1e3)} | {_fmt(row['optimizer_median_s'], '.0f', 1e3)} | "
            f"{_fmt(row.get('ratio_vs_dense_grads'), '.2f')} |"
        )
    if len(lines) == 2:
        raise ValueError(f"framework={framework!r}, but the report has no measured PEER rows of it")
    return "\n".join(lines) + "\n"


def write(report: dict, out) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "train_step.json", "summary": out / "train_step.md"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["summary"].write_text(markdown(report))
    return paths
