"""JSON, Markdown and PNG output of the experiments."""

from __future__ import annotations

import json
from pathlib import Path

LABELS = {
    "dense": "dense FFN (equal FLOPs)",
    "peer": "PEER",
    "peer_no_bn": "PEER, no query BN",
    "peer_glu": "PEER-GLU (equal FLOPs)",
}


def _num(x, digits=3):
    return "–" if x is None else f"{x:.{digits}f}"


def write_json(path: Path, result: dict) -> None:
    path.write_text(json.dumps(result, indent=1, default=float) + "\n")


def header(env: dict, corpus: dict) -> list[str]:
    return [
        f"- command: `{env['command']}`",
        f"- date: {env['date']}"
        + (f", code at commit `{env['git_commit']}`" if env.get("git_commit") else "")
        + f", wall time {env['wall_s']:.0f} s, {env['threads']} threads, {env['cpu_model']}",
        f"- Python {env['python']}; " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        f"- corpus: {corpus['name']} ({corpus['files']} files, {corpus['train_bytes']:,} training bytes, "
        f"{corpus['val_bytes']:,} validation bytes from {corpus['val_files']} files), sha256 `{corpus['sha256']}`",
        "",
    ]


def isoflop_markdown(result: dict) -> list[str]:
    lines = [
        "## isoFLOP in miniature",
        "",
        "Validation bits per byte after training at each compute budget (mean ± sample std over seeds); "
        "every variant of a budget has the same training FLOPs per token (3 × forward, "
        "bench/peer_bench/formulas.py; PEER-GLU: GLU experts, SPEC §3.10, with the top-k that "
        "brings its FLOPs nearest to PEER's). Usage/unevenness: the PEER block on validation data.",
        "",
        "| model | top-k | budget (steps) | training FLOPs | params | val bpb | seeds | usage | unevenness |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["table"]:
        topk = row.get("peer_topk")
        lines.append(
            f"| {LABELS[row['variant']]} | {'–' if topk is None else topk} | {row['budget_steps']} | "
            f"{row['train_flops']:.3g} | "
            f"{row['n_params']:,} | {_bpb(row)} | {row['seeds']} | "
            f"{_num(row['usage_mean'])} | {_num(row['unevenness_mean'])} |"
        )
    return lines + [""]


def usage_markdown(result: dict) -> list[str]:
    lines = [
        "## Table 2 in miniature: expert usage and unevenness",
        "",
        "On the validation batches after training, in evaluation mode (SPEC §11: usage = fraction of "
        "experts with any router weight; unevenness = KL(usage distribution ‖ uniform), nats).",
        "",
        "| experts N | query batch norm | usage | unevenness | val bpb |",
        "|---|---|---|---|---|",
    ]
    for row in result["table"]:
        lines.append(
            f"| {row['n_experts']} ({int(round(row['n_experts'] ** 0.5))}²) | "
            f"{'yes' if row['query_norm'] == 'batch' else 'no'} | {row['usage'] * 100:.1f}% | "
            f"{row['unevenness']:.3f} | {row['val_bpb']:.3f} |"
        )
    return lines + [""]


def transfer_markdown(result: dict) -> list[str]:
    tol = result["tolerance"]
    lines = [
        "## A trained layer moves between frameworks",
        "",
        f"The trained torch model's PEER layer (block {result['block']}) saved with `peer_backends.save`, "
        f"loaded with `peer_backends.load` into each framework and run on its recorded inputs "
        f"({result['tokens_compared']:,} validation tokens, evaluation mode). Tolerance: float32 "
        f"(rtol {tol['rtol']}, atol {tol['atol']}, peer_ref.TOLERANCES).",
        "",
        "| framework | max abs error vs torch | within tolerance | same indices | usage | unevenness |",
        "|---|---|---|---|---|---|",
        f"| torch (source) | – | – | – | {result['torch']['usage'] * 100:.2f}% | {result['torch']['unevenness']:.5f} |",
    ]
    for name, r in result["targets"].items():
        lines.append(
            f"| {name} {r['version']} | {r['max_abs_error']:.2e} | "
            f"{'yes' if r['outputs_within_tolerance'] else 'NO'} | {r['indices_equal'] * 100:.3f}% | "
            f"{r['usage'] * 100:.2f}% | {r['unevenness']:.5f} |"
        )
    return lines + [""]


def _bpb(row: dict) -> str:
    """A table row's validation bits per byte: the mean over seeds, ± the sample std where there are several."""
    std = f" ± {row['val_bpb_std']:.3f}" if row["val_bpb_std"] is not None else ""
    return f"{row['val_bpb_mean']:.3f}{std}"


def _bpb_per_seed(row: dict) -> str:
    """Each seed's validation bits per byte, in seed order."""
    return ", ".join(f"{b:.3f}" for b in row["val_bpb"])


def _pct(x) -> str:
    return "–" if x is None else f"{x * 100:.1f}%"


def _side(n: int) -> str:
    return f"{int(round(n**0.5))}²"


def pool_markdown(result: dict) -> list[str]:
    rows = result["table"]
    lines = [
        "## The pool-size ablation in miniature",
        "",
        f"The same model with N experts in its PEER block, every N at the same heads × top-k, d_model "
        f"and {rows[0]['tokens']:,} training tokens ({result['steps']} steps), trained with row-sparse "
        "expert-table gradients and a lazy Adam on the tables (SPEC §7.1; "
        f"{result['runs'][0]['optimizer']['expert_tables']}, every other parameter "
        f"{result['runs'][0]['optimizer']['other']}). Validation bits per byte (mean ± sample std over "
        "seeds, then each seed's); usage and unevenness of the PEER block on validation data (SPEC §11). "
        "The expert stage's FLOPs per token are the same at every N; the product-key search's grow as √N "
        "(PEER FLOPs/token, forward). Rows per step: the mean fraction of the tables' rows a training "
        "step's gradient listed, i.e. the rows the lazy optimizer updated.",
        "",
        "| experts N | params | PEER FLOPs/token | val bpb | per seed | usage | unevenness | rows per step | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['n_experts']:,} ({_side(row['n_experts'])}) | {row['n_params']:,} | "
            f"{row['peer_flops_per_token']:,} | {_bpb(row)} | "
            f"{_bpb_per_seed(row)} | {row['usage_mean'] * 100:.1f}% | "
            f"{row['unevenness_mean']:.3f} | {_pct(row['rows_listed'])} | {row['tokens_per_s_mean']:,.0f} |"
        )
    lazy = result["lazy"]
    lines += [
        "",
        "### What the lazy optimizer costs",
        "",
        "Runs of the same seeds whose expert tables are stepped by AdamW on dense gradients and by the lazy "
        "optimizer on row-sparse gradients; every other parameter by AdamW in both. Sparse − dense: the mean "
        "over seeds of the difference of the same seed's runs.",
        "",
        "| experts N | expert tables | seeds | val bpb | per seed | sparse − dense | usage | rows per step | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in lazy:
        diff = "–" if row["minus_dense_mean"] is None else f"{row['minus_dense_mean']:+.3f}"
        lines.append(
            f"| {row['n_experts']:,} ({_side(row['n_experts'])}) | {row['optimizer']['expert_tables']} | "
            f"{', '.join(str(s) for s in row['seeds'])} | {_bpb(row)} | "
            f"{_bpb_per_seed(row)} | {diff} | {row['usage_mean'] * 100:.1f}% | "
            f"{_pct(row['rows_listed'])} | {row['tokens_per_s_mean']:,.0f} |"
        )
    return lines + [""]


MARKDOWN = {
    "isoflop": isoflop_markdown,
    "usage": usage_markdown,
    "transfer": transfer_markdown,
    "pool": pool_markdown,
}


def docs_markdown(result: dict) -> str:
    """One experiment for the docs (which give the heading): its description and table, then the
    run's command, date, versions and corpus."""
    body = MARKDOWN[result["experiment"]](result)[2:]  # without its "## title" line
    body = ["#" + line if line.startswith("### ") else line for line in body]  # under the docs' ### heading
    precision = result.get("precision", "float32")
    return "\n".join(
        body
        + [f"Run ({result['size']} size, {precision} training):", "", *header(result["environment"], result["corpus"])]
    )


def isoflop_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, curves) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"dense": "tab:gray", "peer": "tab:blue", "peer_no_bn": "tab:orange", "peer_glu": "tab:green"}
    for variant, label in LABELS.items():
        rows = [r for r in result["table"] if r["variant"] == variant]
        x = [r["train_flops"] for r in rows]
        y = [r["val_bpb_mean"] for r in rows]
        err = [r["val_bpb_std"] or 0.0 for r in rows]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label, color=colors[variant])
        for r in result["runs"]:
            if r["variant"] == variant and r["budget_steps"] == max(_budgets(result)):
                curves.plot(
                    [e["train_flops"] for e in r["evals"]],
                    [e["val_bpb"] for e in r["evals"]],
                    color=colors[variant],
                    alpha=0.7,
                    label=label if r["seed"] == _first_seed(result) else None,
                )
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("after training at each budget")
    ax.legend()
    curves.set_xscale("log")
    curves.set_xlabel("training FLOPs")
    curves.set_ylabel("validation bits per byte")
    curves.set_title(f"during the {max(_budgets(result))}-step runs")
    curves.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _budgets(result: dict) -> list[int]:
    return sorted({r["budget_steps"] for r in result["table"]})


def _first_seed(result: dict) -> int:
    return min(r["seed"] for r in result["runs"])


def usage_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    sizes = sorted({r["n_experts"] for r in result["table"]})
    for query_norm, label, color in (("batch", "query batch norm", "tab:blue"), ("none", "no query BN", "tab:orange")):
        rows = sorted((r for r in result["table"] if r["query_norm"] == query_norm), key=lambda r: r["n_experts"])
        left.plot(
            [r["n_experts"] for r in rows], [100 * r["usage"] for r in rows], marker="o", label=label, color=color
        )
        right.plot(
            [r["n_experts"] for r in rows], [r["unevenness"] for r in rows], marker="o", label=label, color=color
        )
    for ax, ylabel in ((left, "expert usage (%)"), (right, "unevenness (KL to uniform, nats)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [f"{int(round(n**0.5))}²" for n in sizes])
        ax.set_xlabel("experts N")
        ax.set_ylabel(ylabel)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pool_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    rows = result["table"]
    sizes = [r["n_experts"] for r in rows]
    left.errorbar(
        sizes,
        [r["val_bpb_mean"] for r in rows],
        yerr=[r["val_bpb_std"] or 0.0 for r in rows],
        marker="o",
        capsize=3,
        color="tab:blue",
        label="sparse (SparseAdam on the tables), mean ± std",
    )
    for r in rows:
        left.scatter([r["n_experts"]] * len(r["val_bpb"]), r["val_bpb"], color="tab:blue", alpha=0.35, s=12)
    dense = [r for r in result["lazy"] if not r["sparse"]]
    if dense:
        left.scatter(
            [r["n_experts"] for r in dense],
            [r["val_bpb_mean"] for r in dense],
            marker="s",
            color="tab:gray",
            label="dense AdamW on the tables, mean",
            zorder=3,
        )
    left.set_ylabel("validation bits per byte")
    left.legend()
    right.plot(sizes, [100 * r["usage_mean"] for r in rows], marker="o", color="tab:green")
    right.set_ylabel("expert usage (%)")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [_side(n) for n in sizes])
        ax.set_xlabel("experts N")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: Path, name: str, result: dict) -> list[Path]:
    """Write ``<name>.json``, ``<name>.md`` and the experiment's plots into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md"]
    write_json(paths[0], result)
    body = MARKDOWN[result["experiment"]]
    precision = result.get("precision", "float32")  # results written before precision was recorded: float32
    lines = [
        f"# peer_train: {result['experiment']} ({result['size']} size, {precision} training)",
        "",
        *header(result["environment"], result["corpus"]),
        *body(result),
    ]
    if result["experiment"] == "isoflop":
        isoflop_plot(result, out / "isoflop.png")
        lines.append("![isoFLOP](isoflop.png)")
        paths.append(out / "isoflop.png")
    elif result["experiment"] == "usage":
        usage_plot(result, out / "usage.png")
        lines.append("![usage](usage.png)")
        paths.append(out / "usage.png")
    elif result["experiment"] == "pool":
        pool_plot(result, out / "pool.png")
        lines.append("![pool size](pool.png)")
        paths.append(out / "pool.png")
    paths[1].write_text("\n".join(lines) + "\n")
    return paths
