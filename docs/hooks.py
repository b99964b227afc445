"""MkDocs hooks of this site: result tables rendered at build time from the committed result files
by the harnesses' own report functions (never copied by hand), and those files' plots served.

A page asks for a table with one line, ``<!-- results: KIND ARGUMENT -->``; KIND is one of
``RENDERERS``, ARGUMENT a path from the repository root (or, for ``sharded-scaling``, the case as
``field=value,...``; for ``pytest-options`` a module, for ``roles`` a "module.ATTRIBUTE"). tests/test_docs.py checks the pages against these hooks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"^<!-- results: (?P<kind>[\w-]+) (?P<argument>\S+) -->$", re.M)
# Folders whose plots the site serves, under "results/" (bench/results/X -> results/bench/X).
RESULT_FOLDERS = {"bench/results": "results/bench", "train/results": "results/train"}


def _json(path: str) -> dict:
    return json.loads((ROOT / path).read_text())


def _bench_case(report: dict) -> str:
    case, env, settings = report["case"], report["environment"], report["settings"]
    versions = ", ".join(f"{name} {version}" for name, version in env["versions"].items())
    return (
        f"Preset `{settings['preset']}`: d_model {case['d_model']}, N = {case['n_experts']}, heads "
        f"{case['heads']}, top-{case['topk']}, d_key {case['d_key']}, {case['tokens']} tokens, {case['dtype']}; "
        f"{settings['threads']} threads on {env['cpu_model']}, {env.get('date', '')}; {versions}.\n"
    )


def bench_headline(path: str) -> str:
    from peer_bench import report

    data = _json(path)
    return _bench_case(data) + "\n" + report.headline_markdown(data)


def bench_summary(path: str) -> str:
    from peer_bench import report

    return report.summary_markdown(_json(path)).replace("### PEER benchmark", "#### PEER benchmark", 1)


def bench_train_step(path: str) -> str:
    from peer_bench import train_step

    return train_step.markdown(_json(path))


def bench_train_step_rows(argument: str) -> str:
    """One framework's rows of a train_step.json: "PATH,FRAMEWORK"."""
    from peer_bench import train_step

    path, framework = argument.split(",")
    return train_step.rows_markdown(_json(path), framework)


def train(path: str) -> str:
    from peer_train import report

    return report.docs_markdown(_json(path))


def sharded(path: str) -> str:
    from peer_bench import sharded

    return sharded.markdown(_json(path))


def sharded_scaling(argument: str) -> str:
    import dataclasses

    from peer_bench import sharded
    from peer_bench.presets import BenchCase

    fields = dict(item.split("=", 1) for item in argument.split(","))
    devices = tuple(int(p) for p in fields.pop("devices").split("/"))
    types = {f.name: f.type for f in dataclasses.fields(BenchCase)}
    case = BenchCase(tokens=1, **{k: (v if types[k] in ("str", "str | None") else int(v)) for k, v in fields.items()})
    return sharded.scaling_markdown(case, devices)


def pytest_options(module: str) -> str:
    """The command-line options a pytest plugin adds, read from its own ``pytest_addoption``."""
    import importlib

    class Group:
        def __init__(self):
            self.options = []

        def addoption(self, *names, **kwargs):
            self.options.append((names, kwargs))

    class Parser:
        def __init__(self):
            self.groups = []

        def getgroup(self, name, description="", **kwargs):
            self.groups.append(Group())
            return self.groups[-1]

        def addoption(self, *names, **kwargs):
            self.getgroup("").addoption(*names, **kwargs)

        def addini(self, *args, **kwargs):
            pass

    parser = Parser()
    importlib.import_module(module).pytest_addoption(parser)
    lines = ["| option | default | meaning |", "|---|---|---|"]
    for group in parser.groups:
        for names, kwargs in group.options:
            default = kwargs.get("default")
            lines.append(
                f"| `{'`, `'.join(names)}` | {'–' if default is None else f'`{default}`'} | "
                f"{' '.join(kwargs.get('help', '').split()).replace('|', '/')} |"
            )
    return "\n".join(lines) + "\n"


def roles(name: str) -> str:
    """The table of a tuple of ``contract.Role`` (role, name in each backend, the NumPy backend's), read from
    ``name``, a "module.ATTRIBUTE" path."""
    import importlib

    module, attribute = name.rsplit(".", 1)
    lines = ["| role | torch, jax, tensorflow | numpy |", "|---|---|---|"]
    for role in getattr(importlib.import_module(module), attribute):
        numpy = "—" if role.numpy is None else f"`{role.numpy}`"
        lines.append(f"| {role.role.replace('|', '/')} | `{role.name}` | {numpy} |")
    return "\n".join(lines) + "\n"


RENDERERS = {
    "bench-headline": bench_headline,
    "bench-summary": bench_summary,
    "bench-train-step": bench_train_step,
    "bench-train-step-rows": bench_train_step_rows,
    "train": train,
    "sharded": sharded,
    "sharded-scaling": sharded_scaling,
    "pytest-options": pytest_options,
    "roles": roles,
}


def render(markdown: str) -> str:
    """``markdown`` with every results marker replaced by its table."""

    def one(match: re.Match) -> str:
        kind, argument = match["kind"], match["argument"]
        if kind not in RENDERERS:
            raise ValueError(f"results marker kind={kind!r}, but expected one of {sorted(RENDERERS)}")
        return RENDERERS[kind](argument)

    return MARKER.sub(one, markdown)


def served(path: Path) -> str:
    """Where the site serves a result file: bench/results/X/bars.png -> results/bench/X/bars.png."""
    relative = path.relative_to(ROOT).as_posix()
    for folder, url in RESULT_FOLDERS.items():
        if relative.startswith(folder + "/"):
            return url + relative[len(folder) :]
    raise ValueError(f"path={relative!r}, but expected a file under {sorted(RESULT_FOLDERS)}")


def on_files(files, config):
    from mkdocs.structure.files import File

    for folder in RESULT_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.png")):
            files.append(File.generated(config, served(path), abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    return render(markdown)
