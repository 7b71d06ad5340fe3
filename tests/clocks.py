"""A clock that moves only when the test moves it, for code that takes a ``clock`` callable."""

from __future__ import annotations

import queue
import threading


class ManualClock:
    """Seconds that stand still until :meth:`set` or :meth:`advance` is called."""

    def __init__(self, t: float = 0.0) -> None:
        self._t = t
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._t

    def set(self, t: float) -> None:
        with self._lock:
            self._t = t

    def advance(self, dt: float) -> None:
        with self._lock:
            self._t += dt


class Holds:
    """Collects a batcher's ``on_hold`` calls: the clock times until which it planned to hold a batch."""

    def __init__(self) -> None:
        self._q: queue.Queue[float] = queue.Queue()

    def __call__(self, until: float) -> None:
        self._q.put(until)

    def next(self, timeout: float = 30.0) -> float:
        """The next planned release time (blocks until the batcher plans one)."""
        return self._q.get(timeout=timeout)

    def clear(self) -> None:
        while True:
            try:
                self._q.get_nowait()
            except queue.Empty:
                return
