"""Derived numbers (ratios, expert-stage bandwidth), the terminal table, summary.md and the JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .formulas import expert_stage_bytes
from .presets import DTYPE_BYTES

SCHEMA = "peer_bench/1"
MODES = {"forward": "fwd", "forward_backward": "fwd+bwd"}


def label(row: dict) -> str:
    case = row.get("case", {})
    if row["impl"] == "peer_pytorch":
        return "PEER-pytorch" + (f" {case['dtype']}" if case.get("dtype", "float32") != "float32" else "")
    if row["impl"] == "peer" and case.get("expert_glu"):
        return f"PEER-GLU {row['backend']}"
    if row["impl"] == "peer" and case.get("compute_dtype"):
        return f"PEER mixed-{case['compute_dtype']} {row['backend']}"
    return f"{'PEER' if row['impl'] == 'peer' else 'dense'} {row['backend']}"


def _key(row):
    return (row["impl"], row["backend"], row["path"], row["mode"], json.dumps(row["case"], sort_keys=True))


def add_derived(rows: list[dict], copy_bytes_per_s: float | None, reference_rows: list[dict] = ()) -> None:
    """Fill ratio_vs_peer_pytorch, ratio_vs_dense, ratio_vs_plain (PEER-GLU, and the mixed mode, over
    the plain float32 PEER row of the same backend, path and mode; time ratios: below 1 = faster)
    and, for forward rows of a PEER layer, the expert stage's achieved bandwidth over the full-layer
    time. A mixed-mode row's PEER-pytorch ratio is to PEER-pytorch run in the compute dtype."""
    ok = {_key(r): r for r in list(rows) + list(reference_rows) if r.get("status") == "ok"}
    for row in rows:
        if row.get("status") != "ok" or row["impl"] == "dense":
            continue
        case_key = json.dumps(row["case"], sort_keys=True)
        compute = row["case"].get("compute_dtype")
        if row["case"].get("expert_glu") or compute:
            plain_key = json.dumps({**row["case"], "expert_glu": False, "compute_dtype": None}, sort_keys=True)
            plain = ok.get((row["impl"], row["backend"], row["path"], row["mode"], plain_key))
            if plain is not None:
                row["ratio_vs_plain"] = row["median_s"] / plain["median_s"]
        baseline_key = (
            case_key
            if not compute
            else json.dumps({**row["case"], "dtype": compute, "compute_dtype": None}, sort_keys=True)
        )
        baseline = ok.get(("peer_pytorch", "torch", "eager", row["mode"], baseline_key))
        if baseline is not None and row["impl"] != "peer_pytorch":
            row["ratio_vs_peer_pytorch"] = row["median_s"] / baseline["median_s"]
        framework, path = ("torch", "eager") if row["impl"] == "peer_pytorch" else (row["backend"], row["path"])
        dense = ok.get(("dense", framework, path, row["mode"], case_key))
        if dense is not None:
            row["ratio_vs_dense"] = row["median_s"] / dense["median_s"]
        if row["mode"] == "forward":
            c = row["case"]
            moved = expert_stage_bytes(
                c["tokens"],
                c["heads"],
                c["topk"],
                c["d_model"],
                None,
                DTYPE_BYTES[c.get("compute_dtype") or c["dtype"]],
                c.get("expert_glu", False),
            )
            row["expert_stage_bytes"] = moved
            row["expert_bytes_per_s"] = moved / row["median_s"]
            if copy_bytes_per_s:
                row["expert_bandwidth_fraction"] = row["expert_bytes_per_s"] / copy_bytes_per_s


def _fmt(value, spec, scale=1.0):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return format(value * scale, spec)


def _cells(row: dict) -> list[str]:
    head = [label(row), row["path"], MODES[row["mode"]]]
    if row.get("status") != "ok":
        return head + ["–"] * 9 + [f"{row.get('status')}: {row.get('reason')}"]
    iqr = row["q3_s"] - row["q1_s"]
    return head + [
        _fmt(row["median_s"], ".4g", 1e3),
        _fmt(iqr, ".3g", 1e3),
        _fmt(row["tokens_per_s"], ",.0f"),
        _fmt(row["gflops_per_s"], ".3g"),
        f"{_fmt(row.get('peak_mem_bytes'), '.0f', 2**-20)} / {_fmt(row.get('peak_mem_steady_bytes'), '.0f', 2**-20)}",
        _fmt(row.get("ratio_vs_peer_pytorch"), ".3g"),
        _fmt(row.get("ratio_vs_dense"), ".3g"),
        _fmt(row.get("ratio_vs_plain"), ".3g"),
        _fmt(row.get("expert_bandwidth_fraction"), ".1%", 1.0),
        f"{row['repeats']} runs, 1st {row['first_call_s']:.2f} s",
    ]


COLUMNS = [
    "implementation",
    "path",
    "mode",
    "median ms",
    "IQR ms",
    "tokens/s",
    "GFLOP/s",
    "peak MiB all / timed",
    "t / t(PEER-pytorch)",
    "t / t(dense)",
    "t / t(PEER)",
    "expert BW / copy BW",
    "note",
]


def terminal_table(rows: list[dict], title: str):
    """A rich Table of ``rows`` (rich is imported here: the Markdown output needs only the JSON)."""
    from rich.table import Table

    table = Table(title=title, header_style="bold")
    for i, name in enumerate(COLUMNS):
        table.add_column(name, justify="right" if 3 <= i <= len(COLUMNS) - 2 else "left", overflow="fold")
    for row in rows:
        style = None if row.get("status") == "ok" else "dim"
        table.add_row(*_cells(row), style=style)
    return table


def _markdown_table(header: list[str], lines: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell.replace("|", "/") for cell in line) + " |" for line in lines]
    return out


def sweep_table(sweep_rows: list[dict], axis: str) -> tuple[list[str], list[list[str]]] | None:
    """Median forward ms of every implementation at every value of `axis`."""
    field = {"experts": "n_experts", "tokens": "tokens"}[axis]
    rows = [r for r in sweep_rows if axis in r.get("axes", ()) and r.get("status") == "ok"]
    if not rows:
        return None
    values = sorted({r["case"][field] for r in rows})
    names = sorted({f"{label(r)} ({r['path']})" for r in rows})
    grid = {(f"{label(r)} ({r['path']})", r["case"][field]): r["median_s"] for r in rows}
    header = [field] + names
    lines = [[str(v)] + [_fmt(grid.get((n, v)), ".4g", 1e3) for n in names] for v in values]
    return header, lines


def _kwargs(mapping: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in mapping["arguments"].items())


def headline_markdown(report: dict) -> str:
    """The short table the docs open with: each implementation of the plain layer in the run's case
    (float32 PEER per backend and path, PEER-pytorch, the torch dense FFN of equal FLOPs), forward
    and forward+backward median ms, forward+backward peak MiB and time over PEER-pytorch's."""

    def plain(row):
        case = row["case"]
        same_dtype = case.get("dtype") == report["case"]["dtype"]
        return not case.get("expert_glu") and not case.get("compute_dtype") and same_dtype

    by_key = {}
    for row in report["results"]:
        if row.get("status") == "ok" and plain(row) and (row["impl"] != "dense" or row["backend"] == "torch"):
            by_key.setdefault((label(row), row["path"]), {})[row["mode"]] = row
    order = {"peer": 0, "peer_pytorch": 1, "dense": 2}
    lines = [
        "| implementation | path | fwd ms | fwd+bwd ms | fwd+bwd peak MiB | fwd+bwd time / PEER-pytorch's |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for (name, path), modes in sorted(
        by_key.items(), key=lambda item: (order[next(iter(item[1].values()))["impl"]], item[0])
    ):
        fwd, both = modes.get("forward", {}), modes.get("forward_backward", {})
        lines.append(
            f"| {name} | {path} | {_fmt(fwd.get('median_s'), '.0f', 1e3)} | "
            f"{_fmt(both.get('median_s'), '.0f', 1e3)} | {_fmt(both.get('peak_mem_bytes'), '.0f', 2**-20)} | "
            f"{_fmt(both.get('ratio_vs_peer_pytorch'), '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def summary_markdown(report: dict) -> str:
    case = report["case"]
    env = report["environment"]
    bw = report["bandwidth"]
    counts = report["counts"]
    lines = [
        f"### PEER benchmark — preset `{report['settings']['preset']}`, device {report['settings']['device']}",
        "",
        f"Layer: d_model={case['d_model']}, N={case['n_experts']} experts, heads={case['heads']}, "
        f"topk={case['topk']}, d_key={case['d_key']}, {case['tokens']} tokens, {case['dtype']}; shared keys, "
        f"query batch norm. Forward FLOPs/token {counts['peer_flops_per_token']['total']:,}; "
        f"dense FFN width {counts['dense_width']}.",
        "FLOPs/token = 2·d_model·h·d_key (query) + 2·h·√N·d_key (sub-keys) + h·k² (candidates) "
        "+ 2·h·k·(d_model + d_out) (experts; GLU experts add 2·h·k·d_model for the gate); "
        "fwd+bwd counted as 3× fwd. "
        "Dense FFN: gelu(x·W1 + b1)·W2 + b2 with width = round(FLOPs/token / (2·(d_model + d_out))).",
        f"PEER-pytorch {env['versions'].get('PEER-pytorch', '?')} as PEER({_kwargs(report['peer_pytorch_mapping'])}).",
        f"Machine: {env['cpu_model']}, {report['settings']['threads']} threads; "
        f"copy bandwidth {_fmt(bw.get('bytes_per_s'), '.1f', 1e-9)} GB/s ({bw.get('method', bw.get('error'))}); "
        f"load average before/after {env.get('load_average_before')}/{env.get('load_average_after')}.",
        "",
    ]
    lines += _markdown_table(COLUMNS, [_cells(r) for r in report["results"]])
    lines += [
        "",
        "Times are medians; IQR = q3 - q1. Ratios are time ratios (below 1 = faster). "
        "Expert BW = expert-stage bytes / full-layer forward time, over the copy bandwidth. "
        "Peak MiB = resident-memory high-water mark above the level before the first call, over "
        "warm-up (compilation) and timed calls / over the timed calls alone. "
        "PEER-pytorch differs: per-head keys, no batch norm, no expert bias. "
        "PEER-GLU = the same layer with GLU (GEGLU) experts, expert_glu=True (SPEC §3.10); "
        "t / t(PEER) is its time over the plain PEER row of the same backend, path and mode. "
        'PEER mixed-bfloat16 = float32 parameters with bfloat16 x and y, compute_dtype="bfloat16" '
        "(SPEC §10.3); t / t(PEER) over the float32 row, t / t(PEER-pytorch) over PEER-pytorch "
        "bfloat16 (its module cast with .to(torch.bfloat16): it has no mixed mode); its expert "
        "bytes count the rows at 2 bytes, what a kernel reading bfloat16 rows would move.",
    ]
    for axis in ("experts", "tokens"):
        table = sweep_table(report["sweeps"], axis)
        if table:
            lines += ["", f"Forward median ms, sweep over {axis}:", ""] + _markdown_table(*table)
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "summary": out / "summary.md"}
    paths["json"].write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    paths["summary"].write_text(summary_markdown(report))
    return paths
