"""How long a batcher may wait for more requests before the tightest deadline forces it to start.

Serving (:class:`server.infer_batching.InferBatcher`) and the inference simulator both batch
under per-request deadlines; they share this rule so that the simulator predicts the batches
the server really forms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["deadline_wait_ms"]


def deadline_wait_ms(deadlines: Sequence[float], now: float, service_ms: float, max_wait_ms: float = math.inf) -> float:
    """How long a server batcher may still wait before it must start the batch.

    Parameters
    ----------
    deadlines : sequence of float
        Absolute times (ms) by which each request in the batch must leave the server (its
        end-to-end deadline minus the downlink).
    now : float
        Current time (ms), on the same clock.
    service_ms : float
        Service time of the batch if started now.
    max_wait_ms : float
        A cap on the wait regardless of deadlines.

    Returns
    -------
    float
        ``min(deadlines) - now - service_ms`` clipped to ``[0, max_wait_ms]``; 0 for an empty
        batch or when the tightest deadline is already too close (start now).
    """
    if not deadlines:
        return 0.0
    slack = min(deadlines) - now - service_ms
    return float(min(max(slack, 0.0), max_wait_ms))
