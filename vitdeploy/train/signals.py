"""Stopping a run cleanly: SIGINT/SIGTERM are turned into a request the loop checks between
steps (and evaluations between batches), so a stop always leaves a resumable checkpoint."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager


class StopRequest:
    """Set by SIGINT/SIGTERM (or a caller); the loop checks it at every step boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def set(self, signum: int = signal.SIGTERM) -> None:
        self.signum = signum

    def __bool__(self) -> bool:
        return self.signum is not None

    @contextmanager
    def on_signals(self) -> Iterator[None]:
        """Route SIGINT/SIGTERM here; a second SIGINT interrupts at once."""

        def handler(signum: int, _frame: object) -> None:
            if self and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.set(signum)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
