"""Label leakage in a U-shaped split, measured on the wire, and two label-protection defenses.

Where labels are: in the default split the client sends its labels with every batch (the server
computes the loss), so the server knows them outright and no attack is needed. Labels stay on
the client only in the U-shaped split (``model.ushaped``); there the server still receives, per
sample, the gradient ``g_i = dL/dz_i`` of its output ``z_i`` from the client's top segment, and
it computes ``z_i`` itself. On a binary task with a linear top, ``g_i = (p_i - y_i)(w_1 - w_0) / B``:

* ``norm`` (Li et al., ICLR 2022): the minority class, which the model is less sure of, has the
  larger ``|p_i - y_i|``; the score is ``‖g_i‖``;
* ``direction`` (Li et al.): the attacker knows one positive sample; the score is the cosine of
  ``g_i`` with that sample's gradient (the sign of ``p_i - y_i``);
* ``model-completion`` (Fu et al., USENIX Security 2022, passive): the attacker fits a head on its
  own outputs ``z_i`` with a few known labels (a logistic-regression head here, without the
  paper's semi-supervised MixMatch step) and scores every sample with it.

Defenses, on the label party (the client):

* :class:`GradientNoise`, Marvell-style: Gaussian noise on each sample's ``g_i`` before it is
  sent, of total power ``s * ‖ḡ_1 - ḡ_0‖²`` (Marvell's power parameterisation, ``ḡ_c`` the batch
  mean gradient of class ``c``), half along ``ḡ_1 - ḡ_0`` and half isotropic, the same for both
  classes. Marvell itself optimises a separate covariance per class; this is the simpler variant.
* label differential privacy is the framework's own ``privacy.label_dp_epsilon``
  (:func:`fsl.privacy.labels.randomized_response`): every label is replaced once before training
  with probability ``(K-1) / (e^ε + K-1)`` by another class chosen uniformly (ε-label-DP).

:class:`WireTap` stands between the channel and the real :class:`server.split_server.SplitServerState`
and keeps what the server receives and computes: the decoded ``Backward`` gradients and the
``Forward`` outputs, in the order they arrive.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fsl.channel import InMemoryChannel
from fsl.wire import codec
from fsl.wire import dataplane_pb2 as pb

__all__ = [
    "GradientNoise",
    "LabelledBatches",
    "NoisyGradChannel",
    "WireTap",
    "direction_scores",
    "model_completion_scores",
    "norm_scores",
]


@dataclass
class WireTap:
    """A data-plane server that records what the U-shaped split server really sees, then serves it."""

    state: Any  # server.split_server.SplitServerState (ushaped)
    gradients: list[torch.Tensor] = field(default_factory=list)  # per Backward: (B, D) dL/dz as received
    outputs: list[torch.Tensor] = field(default_factory=list)  # per Forward: (B, D) the server's z
    recording: bool = True

    @property
    def accepts_frames(self) -> bool:
        return bool(getattr(self.state, "accepts_frames", False))

    def train(self, request: Any) -> Any:
        return self.state.train(request)

    def infer(self, request: Any) -> Any:
        return self.state.infer(request)

    def info(self) -> pb.InfoReply:
        reply: pb.InfoReply = self.state.info()
        return reply

    def forward(self, request: pb.ForwardRequest) -> pb.ForwardReply:
        reply: pb.ForwardReply = self.state.forward(request)
        if self.recording:
            self.outputs.append(codec.decode(reply.activations, name="activations").float().flatten(1).clone())
        return reply

    def backward(self, request: pb.BackwardRequest) -> pb.BackwardReply:
        if self.recording:
            self.gradients.append(codec.decode(request.grad, name="grad").float().flatten(1).clone())
        reply: pb.BackwardReply = self.state.backward(request)
        return reply


class LabelledBatches:
    """The client's batch order (as ``TrainHooks.batches``), remembering each batch's true labels so that
    the label party's noise knows them and the scorer can pair the server's observations with them."""

    def __init__(self, y_true: torch.Tensor, batch_size: int, seed: int) -> None:
        self.y_true, self.batch_size = y_true, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.order: list[torch.Tensor] = []  # true labels per batch, in wire order
        self.current: torch.Tensor | None = None

    def __call__(self) -> Iterator[torch.Tensor]:
        perm = torch.randperm(len(self.y_true), generator=self.gen)
        for i in range(0, len(perm), self.batch_size):
            idx = perm[i : i + self.batch_size]
            self.current = self.y_true[idx]
            self.order.append(self.current)
            yield idx


@dataclass
class GradientNoise:
    """Marvell-style noise on the gradients the label party sends (see the module docstring)."""

    scale: float  # s: total noise power per sample = s * ‖ḡ_1 - ḡ_0‖²
    batches: LabelledBatches
    seed: int = 0
    _delta: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.gen = torch.Generator().manual_seed(self.seed)

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        y = self.batches.current
        g = grad.flatten(1)  # (B, D)
        if y is not None and bool((y == 1).any()) and bool((y == 0).any()):
            self._delta = g[y == 1].mean(0) - g[y == 0].mean(0)
        if self._delta is None or self.scale <= 0:
            return grad
        power = self.scale * float(self._delta.pow(2).sum())
        unit = self._delta / self._delta.norm().clamp_min(1e-30)
        along = torch.randn(g.shape[0], 1, generator=self.gen) * math.sqrt(power / 2) * unit  # (B, D)
        iso = torch.randn(g.shape, generator=self.gen) * math.sqrt(power / (2 * g.shape[1]))
        return (g + along + iso).reshape(grad.shape).to(grad.dtype)


@dataclass
class NoisyGradChannel(InMemoryChannel):
    """The in-process data plane with the label party's defense applied to every gradient it sends up."""

    grad_noise: GradientNoise | None = None

    def backward(self, grad: Any, forward_step: int, sent: Any = None) -> Any:
        noisy = grad if self.grad_noise is None else self.grad_noise(grad)
        return super().backward(noisy, forward_step, sent)


def norm_scores(g: torch.Tensor) -> np.ndarray:
    """Li et al.'s norm attack: the per-sample gradient norm (higher: positive)."""
    return g.flatten(1).norm(dim=1).numpy()


def direction_scores(g: torch.Tensor, known_positive: int) -> np.ndarray:
    """Li et al.'s cosine attack: cosine similarity with the gradient of one known positive sample."""
    g = g.flatten(1)
    unit = g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return (unit @ unit[known_positive]).numpy()


def model_completion_scores(z: torch.Tensor, known: dict[int, int], seed: int = 0) -> np.ndarray:
    """Fu et al.'s passive model completion: a head on the server's outputs from a few known labels."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    feats = z.flatten(1).numpy()
    rows = list(known)
    scaler = StandardScaler().fit(feats)
    head = LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed)
    head.fit(scaler.transform(feats[rows]), [known[i] for i in rows])
    scores: np.ndarray = head.predict_proba(scaler.transform(feats))[:, 1]
    return scores
