"""Split-inference studies across device, edge and cloud (``fsl run inference``).

The models and tools the studies use: measured per-block profiles (:mod:`.profiles`), a
latency-aware cut scheduler (:mod:`.scheduler`), a discrete-event simulator (:mod:`.simulate`)
validated against real split inference on loopback (:mod:`.loopback`), data-cartography routing
(:mod:`.cartography`, :mod:`.routing`) and stage provisioning (:mod:`.provisioning`);
:mod:`.study` runs them all. What serving needs at run time stays below: multi-exit heads in
:mod:`fsl.exits`, deadline-aware batching in :mod:`server.infer_batching` (its wait rule in
:mod:`fsl.deadlines`).
"""

from __future__ import annotations

from experiments.inference.study import main

__all__ = ["main"]
