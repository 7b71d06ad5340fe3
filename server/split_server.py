"""The split server: hosts the server segment and serves the data plane.

The pieces live beside this module, one job each:

* :mod:`server.state` -- :class:`SplitServerState`: admission, the steps, commit, checkpoints;
* :mod:`server.validation` -- the checks a request's tensors must pass (:class:`InvalidRequest`);
* :mod:`server.step` -- the one training step (one request or a batch) and inference;
* :mod:`server.ushaped` -- U-shaped Forward/Backward;
* :mod:`server.replicas` -- segment copies per client or group (SplitFed v1, hybrid);
* :mod:`server.jobs` -- admitted requests as the steps and the batchers see them;
* :mod:`server.servicer` -- :class:`SplitServicer` and :class:`SplitServer`: gRPC, status codes, TLS.

This module keeps the names callers import.
"""

from __future__ import annotations

from server.servicer import SplitServer, SplitServicer, add_servicer
from server.state import ClientStats, SplitServerState, resolve_device
from server.validation import ACTIVATION_DTYPES, InvalidRequest

__all__ = [
    "ACTIVATION_DTYPES",
    "ClientStats",
    "InvalidRequest",
    "SplitServer",
    "SplitServerState",
    "SplitServicer",
    "add_servicer",
    "resolve_device",
]
