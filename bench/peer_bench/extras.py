"""The pip extra a harness needs, checked before it starts any work: a user who installed the
package without it gets one line naming the extra, not a ModuleNotFoundError from deep inside."""

from __future__ import annotations

import importlib.util
import sys


def require(program: str, extra: str, modules: tuple[str, ...]) -> None:
    """Exit with status 2 and one line on stderr if any of ``modules`` is not installed."""
    missing = [name for name in dict.fromkeys(modules) if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"error: {program} needs {', '.join(missing)}, which the {extra!r} extra installs: "
            f'pip install "peer-layer[{extra}]"',
            file=sys.stderr,
        )
        raise SystemExit(2)
