"""Progress that reaches a log: long passes (training, parity, calibration) say where they are at a
steady interval, so a run under nohup or in CI is never silent for an hour."""

from __future__ import annotations

import os
import time

# Seconds between progress lines (VITDEPLOY_PROGRESS_LINE_S overrides; 0 prints every chance).
LINE_S = float(os.environ.get("VITDEPLOY_PROGRESS_LINE_S", "30"))


class Ticker:
    """True at most once per LINE_S seconds; the first time LINE_S after it was made."""

    def __init__(self) -> None:
        self.last = time.perf_counter()

    def due(self) -> bool:
        now = time.perf_counter()
        if now - self.last < LINE_S:
            return False
        self.last = now
        return True


def eta(seconds: float | None) -> str:
    """H:MM:SS for a time left, '?' when it is not known yet."""
    return "?" if seconds is None else time.strftime("%H:%M:%S", time.gmtime(max(0.0, seconds)))
