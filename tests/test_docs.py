"""The documentation: every Python example of the README and docs/ runs as written, the result
tables come from the committed result files, and the README stays a front page."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(?P<info>[^\n]*)\n(?P<code>.*?)^```$", re.M | re.S)
NOT_RUN = re.compile(r"<!-- not run: (?P<reason>[^>]*?) -->\n$")


def _hooks():
    spec = importlib.util.spec_from_file_location("peer_docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line, code) of each ```python block not marked ``<!-- not run: reason -->`` just above it."""
    blocks = []
    for match in FENCE.finditer(text):
        if match["info"].strip() == "python" and not NOT_RUN.search(text[: match.start()]):
            blocks.append((text.count("\n", 0, match.start()) + 2, match["code"]))
    return blocks


def test_python_blocks_are_found_and_skipped_as_marked():
    text = (
        "```python\na = 1\n```\n\n<!-- not run: needs torchrun -->\n```python\nb = 2\n```\n"
        "```bash\nls\n```\n```python\nc = 3\n```\n"
    )
    assert python_blocks(text) == [(2, "a = 1\n"), (13, "c = 3\n")]


def _relative(page: Path) -> str:
    return str(page.relative_to(ROOT))


RUNNABLE = [page for page in PAGES if python_blocks(page.read_text())]


@pytest.mark.parametrize("page", RUNNABLE, ids=_relative)
def test_examples_run(page, tmp_path):
    # One process per page, its blocks in order and in a fresh folder, as a reader would paste them.
    blocks = python_blocks(page.read_text())
    imported = {name for _, code in blocks for name in re.findall(r"^(?:import|from) (\w+)", code, re.M)}
    missing = sorted(name for name in imported if importlib.util.find_spec(name) is None)
    if missing:
        pytest.skip(f"{_relative(page)} imports {missing}, which are not installed")
    script = "".join(f"# {_relative(page)}, line {line}\n{code}\n" for line, code in blocks)
    (tmp_path / "example.py").write_text(script)
    result = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{_relative(page)}'s examples failed:\n{result.stderr[-4000:]}"


@pytest.mark.parametrize("page", PAGES, ids=_relative)
def test_skipped_blocks_say_why_and_are_python(page):
    text = page.read_text()
    for match in re.finditer(r"<!-- not run:(?P<reason>[^>]*)-->\n(?P<next>[^\n]*)", text):
        assert match["reason"].strip(), f"{_relative(page)}: a 'not run' marker without its reason"
        assert match["next"] == "```python", f"{_relative(page)}: 'not run' must stand just above a ```python block"


def _markers() -> list[tuple[Path, str, str]]:
    hooks = _hooks()
    return [(page, m["kind"], m["argument"]) for page in PAGES for m in hooks.MARKER.finditer(page.read_text())]


def test_result_tables_are_rendered_from_the_result_files():
    hooks = _hooks()
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    rendered = hooks.render(page)
    assert "<!-- results:" not in rendered
    path = re.search(r"<!-- results: bench-headline (\S+) -->", page)[1]
    report = json.loads((ROOT / path).read_text())
    plain = [
        row
        for row in report["results"]
        if row["status"] == "ok"
        and row["impl"] == "peer"
        and not row["case"].get("expert_glu")
        and not row["case"].get("compute_dtype")
    ]
    assert plain
    for row in plain:  # every time of the run's plain rows appears, as the harness rounds it
        assert f"| {row['median_s'] * 1e3:.0f} |" in rendered, (row["backend"], row["path"], row["mode"])
    path = re.search(r"<!-- results: bench-train-step (\S+) -->", page)[1]
    steps = [row for row in json.loads((ROOT / path).read_text())["rows"] if row["status"] == "ok"]
    assert {row["grads"] for row in steps} == {"dense", "sparse"}
    for row in steps:  # every training step's time appears, as the harness rounds it
        assert f"| {row['median_s'] * 1e3:.0f} | {row['forward_backward_median_s'] * 1e3:.0f} |" in rendered, row
    jax_page = (ROOT / "docs" / "getting-started" / "jax.md").read_text()
    path, framework = re.search(r"<!-- results: bench-train-step-rows (\S+),(\w+) -->", jax_page).groups()
    jax_rows = hooks.render(jax_page)
    for row in json.loads((ROOT / path).read_text())["rows"]:  # that framework's layer rows, and no other
        shown = f"| {row['median_s'] * 1e3:.0f} | {row['forward_backward_median_s'] * 1e3:.0f} |" in jax_rows
        assert shown == (row["impl"] == "peer" and row["backend"].startswith(framework)), row
    training = hooks.render((ROOT / "docs" / "training.md").read_text())
    isoflop = json.loads((ROOT / "train" / "results" / "isoflop.json").read_text())
    for row in isoflop["table"]:
        assert f"{row['val_bpb_mean']:.3f}" in training
    pool = json.loads((ROOT / "train" / "results" / "pool.json").read_text())
    for row in pool["table"] + pool["lazy"]:
        assert f"| {row['val_bpb_mean']:.3f}" in training


def test_unknown_result_kind_is_refused():
    with pytest.raises(ValueError, match=r"kind='bench-table', but expected one of"):
        _hooks().render("<!-- results: bench-table bench/results/x/results.json -->\n")


def test_every_committed_result_is_cited_and_every_citation_exists():
    cited = " ".join(page.read_text() for page in PAGES)
    for kind, argument in ((kind, argument) for _, kind, argument in _markers()):
        if kind not in ("sharded-scaling", "pytest-options", "roles"):
            path = argument.split(",")[0]  # "PATH,FRAMEWORK" for bench-train-step-rows
            assert (ROOT / path).is_file(), f"results: {kind} {argument} names no file"
    folders = [p for p in (ROOT / "bench" / "results").iterdir() if p.is_dir()]
    for folder in folders:
        assert f"bench/results/{folder.name}/" in cited, f"{folder} is cited by no page: remove it (git rm -r)"
    for result in (ROOT / "train" / "results").glob("*.json"):
        assert f"train/results/{result.name}" in cited, f"{result} is cited by no page"


def _quick_start() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [
        line.split("#")[0].strip()
        for block in re.findall(r"```bash\n(.*?)```", section, re.S)
        for line in block.splitlines()
        if "nox" in line
    ]


def test_readme_is_a_front_page_with_two_quick_start_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 200, f"README.md has {len(lines)} lines, but a front page has under 200"
    commands = _quick_start()
    assert len(commands) == 2, commands
    assert commands[0].endswith("python3 -m nox -s bench"), commands[0]  # the benchmark, default preset
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = shlex.split(commands[1].split("&&")[-1])
    assert " ".join(test_command) in ci, f"{commands[1]!r}: .ci/run must run the README's test command"


def test_readme_names_the_releases_ci_tests():
    readme = (ROOT / "README.md").read_text()
    lines = [line.split("#")[0].strip() for line in (ROOT / "constraints" / "ci.txt").read_text().splitlines()]
    pins = dict(line.split("==") for line in lines if line)
    for name in ("torch", "jax", "flax", "tensorflow-cpu", "keras"):
        assert f"{name} {pins[name]}" in readme, f"README.md must say CI tests {name} {pins[name]} (constraints/ci.txt)"


def test_role_table_is_rendered_from_the_contract():
    from peer_backends.contract import ROLES

    page = (ROOT / "docs" / "api" / "peer_backends.md").read_text()
    rendered = _hooks().render(page)
    assert "<!-- results:" not in rendered
    for role in ROLES:
        assert f"| `{role.name}` |" in rendered, role
