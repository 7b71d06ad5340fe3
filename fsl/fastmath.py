"""Denormal floats flushed to zero on the threads that train (CPU speed).

SGD momentum buffers of weights that stop receiving gradient (a ReLU unit that no longer fires)
decay by ``momentum`` every step, and after a few hundred steps they hold denormal floats
(below 1.2e-38). x86 and ARM cores compute on denormals tens of times slower than on normal
floats: on the quickstart's server segment the optimizer step grew from 0.32 to 0.84 ms per
batch (``benchmarks/bench_e2e.py``: about 10% of the split server's time). Flushing them to zero
changes no value a model can tell apart from zero.

The setting is the float unit's control register, which belongs to a thread (new threads
inherit it from the thread that starts them), so every training loop calls
:func:`flush_denormals` in its own thread. ``FSL_FLUSH_DENORMAL=0`` keeps IEEE denormals.
"""

from __future__ import annotations

import os

import torch

__all__ = ["flush_denormals"]

_ENABLED = os.environ.get("FSL_FLUSH_DENORMAL", "1") != "0"


def flush_denormals() -> bool:
    """Flush denormal floats to zero in the calling thread; whether the CPU supports it (x86 SSE3, ARM64)."""
    if not _ENABLED:
        return False
    return bool(torch.set_flush_denormal(True))
