"""Resident-memory high-water mark of this process, for CPU runs.

On Linux the mark (VmHWM) can be reset by writing "5" to /proc/self/clear_refs, so one process can
measure a peak per phase; where that is refused, ru_maxrss (never reset) is used instead and only
the first measurement of a process is meaningful — which is why every matrix cell gets a fresh
worker process.
"""

from __future__ import annotations

import resource
import sys


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _ru_maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


class RSSMeter:
    """reset() -> current bytes (and resets the mark where possible); peak() -> mark in bytes."""

    def __init__(self):
        self.resets = self._reset_mark()
        self.method = "VmHWM reset via /proc/self/clear_refs" if self.resets else "ru_maxrss"

    @staticmethod
    def _reset_mark() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
            return _status_kib("VmHWM") is not None
        except OSError:
            return False

    def reset(self) -> int:
        if self.resets:
            self._reset_mark()
        current = _status_kib("VmRSS")
        # Without /proc the current size is unknown; the mark so far is an upper bound of it,
        # so deltas are then lower bounds.
        return current * 1024 if current is not None else _ru_maxrss_bytes()

    def peak(self) -> int:
        if self.resets:
            return _status_kib("VmHWM") * 1024
        return _ru_maxrss_bytes()


def cpu_meter() -> RSSMeter:
    return RSSMeter()
