"""The verdict of a conformance run: one line per spec section, built from pytest's own reports.

Each test module names its section (``SECTION``). A section has *failed* when one of its tests
failed (each failure listed with its message and the smallest falsifying input Hypothesis found,
or the test's parameters), *passed* when none failed and at least one passed, and is *not
supported* when every test of it needs an option or capability the backend does not declare.
The options a section's draws had to leave out (``strategies.declared``) and the tests skipped as
not supported are listed on its line either way. Known divergences (xfail) count as failures.

The plugin registers a ``Verdict`` in runs that name a backend; it prints the verdict in the
terminal summary and writes it with ``--peer-verdict-json PATH`` / ``--peer-verdict-md PATH``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .plugin import conformance_backend, error_level, short_id

NOT_SUPPORTED = "not supported: "


@dataclass
class Failure:
    test: str
    message: str
    input: str
    known: str = ""  # the reason of a known divergence (xfail), else empty

    def as_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if v or k != "known"}


@dataclass
class Section:
    title: str
    module: str
    passed: list[str] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)
    not_supported: dict[str, str] = field(default_factory=dict)  # test -> what it needs
    left_out: set[str] = field(default_factory=set)  # option values its draws left out

    @property
    def status(self) -> str:
        if self.failed:
            return "failed"
        if self.passed:
            return "passed"
        return "not supported" if self.not_supported else "not run"

    def lacking(self) -> list[str]:
        """The option values and capabilities its tests skipped as not supported need, sorted."""
        return sorted({part for reason in self.not_supported.values() for part in reason.split(", ")})

    def as_dict(self) -> dict:
        return {
            "section": self.title,
            "module": self.module,
            "status": self.status,
            "passed": len(self.passed),
            "failed": [f.as_dict() for f in self.failed],
            "not_supported": dict(sorted(self.not_supported.items())),
            "not_exercised": sorted(self.left_out),
            "lacking": self.lacking(),
        }


def _section_key(title: str):
    numbers = re.match(r"§([\d.]+)", title)
    return (0, [int(n) for n in numbers.group(1).split(".")]) if numbers else (1, [title])


def _minimal_input(item, exc) -> str:
    """The failing example Hypothesis reports after shrinking (the backend argument dropped), or the
    test's parameters."""
    lines = []
    for note in map(str, getattr(exc, "__notes__", ())):
        if note.startswith(("Falsifying", "Failing")):  # the call with every argument, one per line
            for line in note.splitlines():
                if not line.strip().startswith("backend="):
                    lines.append(line)
                if line == ")":
                    break
        elif note.startswith("Draw "):
            lines.append(note)
    if lines:
        return "\n".join(lines)
    params = {k: v for k, v in item.callspec.params.items() if k != "backend"}
    return ", ".join(f"{k}={v!r}" for k, v in params.items()) or "(no parameters)"


def _message(exc) -> str:
    if isinstance(exc, pytest.fail.Exception):
        text = str(exc.msg)
    elif isinstance(exc, AssertionError):  # its message, without pytest's rewritten expression
        text = str(exc).split("\nassert ")[0]
    else:  # an error of the implementation: its first line says what
        text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    text = " ".join(line.strip() for line in text.strip().splitlines()) or type(exc).__name__
    return text if len(text) <= 500 else text[:497] + "..."


class Verdict:
    """Collects each conformance test's outcome per backend and section; reports at the end."""

    def __init__(self, config):
        self.config = config
        self.backends: dict[str, dict[str, Section]] = {}
        self.modules: dict[str, object] = {}  # backend name -> backend module

    def _section(self, item, name: str) -> Section:
        module = item.module.__name__.rsplit(".", 1)[-1]
        title = getattr(item.module, "SECTION", module)
        return self.backends.setdefault(name, {}).setdefault(title, Section(title, module))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = yield
        name = conformance_backend(item)
        if name is None:
            return report
        if "backend" in getattr(item, "funcargs", {}):
            self.modules.setdefault(name, item.funcargs["backend"])
        section = self._section(item, name)
        test = short_id(item)
        section.left_out.update(value for key, value in item.user_properties if key == "peer_left_out")
        if report.skipped and hasattr(report, "wasxfail"):
            section.failed.append(
                Failure(
                    test,
                    _message(call.excinfo.value),
                    _minimal_input(item, call.excinfo.value),
                    known=report.wasxfail or "known divergence",
                )
            )
        elif report.skipped and report.when in ("setup", "call"):
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            reason = reason.removeprefix("Skipped: ")
            if reason.startswith(NOT_SUPPORTED):
                section.not_supported[test] = reason.removeprefix(NOT_SUPPORTED)
        elif report.failed and report.when in ("setup", "call"):
            if call.excinfo is not None:
                section.failed.append(
                    Failure(test, _message(call.excinfo.value), _minimal_input(item, call.excinfo.value))
                )
            else:  # an unexpected pass of a known divergence (strict xfail)
                section.failed.append(Failure(test, "passed, but is listed as a known divergence", "-"))
        elif report.passed and report.when == "call":
            section.passed.append(test)
        return report

    # --- output -----------------------------------------------------------------------------

    def verdicts(self) -> list[dict]:
        from hypothesis import settings

        out = []
        for name, sections in self.backends.items():
            module = self.modules.get(name)
            out.append(
                {
                    "backend": getattr(module, "name", name),
                    "module": name,
                    "version": str(getattr(module, "version", "?")),
                    "declared_options": {k: list(v) for k, v in (getattr(module, "options", None) or {}).items()},
                    "capabilities": sorted(getattr(module, "capabilities", ())),
                    "errors_judged_by": error_level(self.config, name),
                    "hypothesis_profile": settings.get_current_profile_name(),
                    "command": " ".join(["pytest", *self.config.invocation_params.args]),
                    "sections": [s.as_dict() for s in sorted(sections.values(), key=lambda s: _section_key(s.title))],
                }
            )
        return out

    def pytest_terminal_summary(self, terminalreporter):
        verdicts = self.verdicts()
        for verdict in verdicts:
            write = terminalreporter.write_line
            terminalreporter.write_sep("=", f"PEER conformance verdict: {verdict['backend']} {verdict['version']}")
            for line in text_lines(verdict):
                write(line)
        json_path = self.config.getoption("--peer-verdict-json")
        if json_path:
            Path(json_path).write_text(json.dumps(verdicts, indent=2) + "\n")
        md_path = self.config.getoption("--peer-verdict-md")
        if md_path:
            Path(md_path).write_text(markdown(verdicts))


def _counts(section: dict) -> str:
    return f"passed {section['passed']}, failed {len(section['failed'])}, not supported {len(section['not_supported'])}"


def text_lines(verdict: dict) -> list[str]:
    """The terminal form: one line per section, then its failures and what it could not check
    (the rules skipped as not supported, the option values left out of its draws)."""
    width = max((len(s["section"]) for s in verdict["sections"]), default=0)
    lines = []
    for section in verdict["sections"]:
        lines.append(f"{section['section']:<{width}}  {section['status'].upper():<13}  ({_counts(section)})")
        for failure in section["failed"]:
            known = f" [known divergence: {failure['known']}]" if failure.get("known") else ""
            lines.append(f"    {failure['test']}: {failure['message']}{known}")
            lines.extend(f"        {line}" for line in failure["input"].splitlines())
        if section["lacking"]:
            lines.append(f"    not supported: {'; '.join(section['lacking'])}")
        if section["not_exercised"]:
            lines.append(f"    not drawn: {'; '.join(section['not_exercised'])}")
    return lines


def _prose(text: str) -> str:
    """``text`` (an error message, a reason) as literal Markdown: brackets, emphasis and HTML
    characters escaped, so ``aux['indices']=[[[2]]]`` reads as written and is no link."""
    return re.sub(r"([\\`*_\[\]<>|])", r"\\\1", text)


def markdown(verdicts: list[dict]) -> str:
    """The verdict as a Markdown document (what docs/conformance shows)."""
    out = []
    for v in verdicts:
        out += [
            f"# Conformance verdict: {v['backend']} {v['version']}",
            "",
            f"Backend module `{v['module']}`; capabilities {', '.join(v['capabilities']) or 'none'}; "
            f"errors judged by {v['errors_judged_by']}; Hypothesis profile `{v['hypothesis_profile']}`. "
            "Produced by:",
            "",
            "```bash",
            v["command"],
            "```",
            "",
        ]
        if v["declared_options"]:
            out += ["Declared options (the values it supports; every other option supports every value):", ""]
            out += [f"- `{k}`: {', '.join(repr(x) for x in values)}" for k, values in v["declared_options"].items()]
            out.append("")
        not_drawn = sorted({x for s in v["sections"] for x in s["not_exercised"]})
        if not_drawn:
            out += [
                "Configs and calls were drawn from the supported values only; left out: "
                + ", ".join(f"`{x}`" for x in not_drawn)
                + ".",
                "",
            ]
        out += ["| Section | Verdict | Tests | Tests not supported, for |", "|---|---|---|---|"]
        for s in v["sections"]:
            lacking = "; ".join(s["lacking"]) or "-"
            out.append(f"| {s['section']} | **{s['status']}** | {_counts(s)} | {lacking} |")
        failed = [s for s in v["sections"] if s["failed"]]
        if failed:
            out += ["", "## Failures", ""]
        for s in failed:
            out += [f"### {s['section']}", ""]
            reason = None
            for failure in s["failed"]:
                if failure.get("known") and failure["known"] != reason:
                    reason = failure["known"]
                    out += [f"Known divergence: {_prose(reason)}", ""]
                out += [f"- `{failure['test']}`: {_prose(failure['message'])}", "", "  ```text"]
                out += [f"  {line}" for line in failure["input"].splitlines()]
                out += ["  ```", ""]
        out.append("")
    return "\n".join(out).rstrip() + "\n"
