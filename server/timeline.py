"""The time the batchers plan on, and who hears of their plans."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Timeline"]


@dataclass(frozen=True)
class Timeline:
    """A batcher's clock and its hold tracer.

    Every wait a batcher plans (for company, for a deadline) is computed on ``clock``; a test passes
    a clock it moves by hand and reads the planned schedule from ``on_hold`` instead of timing the
    machine.
    """

    clock: Callable[[], float] = time.monotonic  # seconds, monotonic
    # called with the clock time until which a batch is held, each time the batcher decides to wait
    on_hold: Callable[[float], None] | None = None

    def hold(self, cond: threading.Condition, until: float, now: float) -> None:
        """Wait on ``cond`` (held by the caller) until clock time ``until`` or a notify."""
        if self.on_hold is not None:
            self.on_hold(until)
        cond.wait(max(0.0, until - now))
