"""PNG plots: implementations side by side, and forward time along each sweep."""

from __future__ import annotations

from pathlib import Path

from .report import MODES, label


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    return plt


def bars(rows: list[dict], path: Path) -> Path | None:
    """Median time per implementation and path, forward and forward+backward side by side."""
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return None
    plt = _pyplot()
    names = list(dict.fromkeys(f"{label(r)}\n{r['path']}" for r in ok))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) + 2), 4.5))
    width = 0.4
    for offset, mode in zip((-width / 2, width / 2), MODES):
        by_name = {f"{label(r)}\n{r['path']}": r for r in ok if r["mode"] == mode}
        xs = [i + offset for i, n in enumerate(names) if n in by_name]
        picked = [by_name[n] for n in names if n in by_name]
        medians = [r["median_s"] * 1e3 for r in picked]
        spread = [
            [(r["median_s"] - r["q1_s"]) * 1e3 for r in picked],
            [(r["q3_s"] - r["median_s"]) * 1e3 for r in picked],
        ]
        ax.bar(xs, medians, width, yerr=spread, capsize=2, label=MODES[mode])
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("median time per call (ms, log)")
    case = ok[0]["case"]
    ax.set_title(f"N={case['n_experts']}, {case['tokens']} tokens, d_model={case['d_model']}, {case['dtype']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sweep(rows: list[dict], axis: str, path: Path) -> Path | None:
    """Forward median time against the swept field, one line per implementation, log-log."""
    field = {"experts": "n_experts", "tokens": "tokens"}[axis]
    ok = [r for r in rows if axis in r.get("axes", ()) and r.get("status") == "ok"]
    if not ok:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name in sorted({f"{label(r)} ({r['path']})" for r in ok}):
        line = sorted((r["case"][field], r["median_s"] * 1e3) for r in ok if f"{label(r)} ({r['path']})" == name)
        ax.plot([v for v, _ in line], [t for _, t in line], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("n_experts (N)" if axis == "experts" else "tokens")
    ax.set_ylabel("forward median time (ms, log)")
    ax.set_title(f"PEER forward time vs {'N' if axis == 'experts' else 'tokens'}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_all(report: dict, out: Path) -> dict[str, Path]:
    written = {}
    for name, make in (
        ("bars", lambda p: bars(report["results"], p)),
        ("sweep_experts", lambda p: sweep(report["sweeps"], "experts", p)),
        ("sweep_tokens", lambda p: sweep(report["sweeps"], "tokens", p)),
    ):
        path = make(out / f"{name}.png")
        if path is not None:
            written[name] = path
    return written
