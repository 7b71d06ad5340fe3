"""Drive real split training in-process and record what the server sees (for the leakage sweep and tests).

The pieces are the framework's own: :class:`server.split_server.SplitServerState`
behind an :class:`fsl.channel.InMemoryChannel` (real codec, real validation), the
client trainer :func:`clients.trainer.train_segment`, and
:class:`server.recorder.ObservationRecorder` as the server's observer. The
defenses are the ones a run ships, chosen by the same experiment-config keys: the
``[privacy]`` section (DP-SGD with Opacus and NoPeek through
:func:`fsl.privacy.client.client_privacy`, top-k or int8 compression through the
channel's wire format, :func:`fsl.privacy.client.wire_dtype_for`) and
``[activation_noise]`` (:func:`fsl.privacy.activation_release` on every release).
The data owner's :class:`attacks.ground_truth.GroundTruthTap` writes the inputs
of the recorded batches to ``ground_truth/``. The result is a run directory that
``fsl attack`` reads exactly like one from ``fsl run``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attacks.base import Observation, sample_keys
from attacks.ground_truth import GroundTruthTap
from attacks.models import segments
from clients.trainer import TrainOptions, evaluate_split, train_local, train_segment
from fsl.channel import ChannelIdentity, InMemoryChannel
from fsl.config import ExperimentConfig
from fsl.models import cut_shape
from fsl.privacy import activation_release
from fsl.privacy.client import client_privacy, wire_dtype_for
from fsl.privacy.dp import PrivacyLedger
from server.recorder import ObservationRecorder
from server.split_server import SplitServerState

__all__ = [
    "TrainedSplit",
    "activation_norm",
    "defense_label",
    "fl_step_observation",
    "record_gradient_step",
    "record_round",
    "train_split",
]


def defense_label(config: ExperimentConfig) -> str:
    """A short name of the defenses ``config`` turns on: ``none``, ``noise(0.01)``, ``dpsgd(1)+compression(0.1)``, ..."""
    p, noise = config.privacy, config.activation_noise
    parts = []
    if noise.mechanism != "none":
        kind = "noise" if noise.mechanism == "gaussian" else "laplace-noise"
        parts.append(f"{kind}({noise.noise_multiplier:g})")
    if p.nopeek_weight > 0:
        parts.append(f"nopeek({p.nopeek_weight:g})")
    if p.dp.enabled:
        parts.append(
            f"dpsgd({p.dp.noise_multiplier:g})" if p.dp.target_epsilon == 0 else f"dpsgd(eps={p.dp.target_epsilon:g})"
        )
    if p.compression == "topk":
        parts.append(f"compression({p.topk_ratio:g})")
    elif p.compression != "none":
        parts.append(f"compression({p.compression})")
    return "+".join(parts) or "none"


def activation_norm(
    model: str, cut: str, x: torch.Tensor, *, num_classes: int = 10, seed: int = 0, n: int = 256
) -> float:
    """Median per-sample L2 norm at ``cut`` of the fresh (seeded) ``model`` on ``x[:n]``.

    A clip norm for ``[activation_noise]`` near the typical activation norm: far below it the
    clipping alone destroys the signal, far above it the same noise multiplier means more noise.
    """
    client, _ = segments(model, cut, tuple(x.shape[1:]), num_classes, seed=seed)
    with torch.no_grad():
        return float(client(x[:n]).flatten(1).norm(dim=1).median())


@dataclass
class TrainedSplit:
    client: nn.Module
    state: SplitServerState
    release: Callable[[torch.Tensor], torch.Tensor] | None
    model: str
    cut: str
    input_shape: tuple[int, ...]
    num_classes: int
    config: ExperimentConfig = field(default_factory=ExperimentConfig)
    next_round: int = 2_000  # record_gradient_step: a fresh round each (the server caches step replies)
    # every DP-SGD step the client took (noise, sample rate, steps), as the ServerApp's ledger keeps it
    ledger: PrivacyLedger = field(init=False)

    def __post_init__(self) -> None:
        self.ledger = PrivacyLedger(self.config.privacy.dp.accountant, self.config.privacy.dp.delta)

    def dp_epsilon(self) -> float | None:
        """DP-SGD's epsilon over every step so far at ``privacy.dp.delta`` (None without DP-SGD).

        It bounds what the client's segment updates reveal of one training sample; the
        activations the attacks invert are not covered (see ``fsl.privacy``)."""
        return self.ledger.epsilon("0") if self.ledger.histories else None

    @property
    def defense(self) -> str:
        return defense_label(self.config)

    def channel(self, rnd: int, client: str = "0", config: ExperimentConfig | None = None) -> InMemoryChannel:
        """The data plane to the split server, in the wire format the config's compression asks for."""
        return InMemoryChannel(
            server=self.state,
            identity=ChannelIdentity(run_id="leakage", round=rnd, client_id=client),
            wire_dtype=wire_dtype_for(config or self.config),
        )

    def task_accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Split inference on held-out data, with the defense applied to what is sent."""
        return evaluate_split(self.client, x, y, self.channel(0), release=self.release).accuracy


def _train_round(
    trained: TrainedSplit,
    segment: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    channel: InMemoryChannel,
    *,
    config: ExperimentConfig,
    release: Callable[[torch.Tensor], torch.Tensor] | None,
    batch_size: int,
    lr: float,
    momentum: float = 0.9,
    seed: int = 0,
) -> None:
    """One local epoch of the client as the ClientApp runs it: ``config``'s DP-SGD and NoPeek
    (:func:`fsl.privacy.client.client_privacy`) around :func:`clients.trainer.train_segment`.

    ``segment`` is what runs forward (the client segment, or a ground-truth tap around it); the
    privacy wiring attaches to ``trained.client`` itself, as the ClientApp attaches it to its module.
    """
    options = TrainOptions(epochs=1, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=0.0, seed=seed)
    # a round starts in training mode, as the ClientApp's freshly built segment does: an evaluation
    # in between (task_accuracy) left it in eval mode, which Opacus refuses
    trained.client.train()
    privacy = client_privacy(config, trained.client, len(y), options, 0)
    hooks = privacy.hooks
    if hooks.release is None and release is not None:
        hooks = dataclasses.replace(hooks, release=release)
    try:
        train_segment(segment, x, y, channel, privacy.options, hooks)
    finally:
        if privacy.session is not None:
            s = privacy.session
            trained.ledger.record("0", s.noise_multiplier, s.sample_rate, s.steps)
            s.close()  # Opacus' hooks off the segment: the attacker's copy is a plain module


def train_split(
    model: str,
    cut: str,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    num_classes: int = 10,
    config: ExperimentConfig | None = None,
    epochs: int = 2,
    batch_size: int = 32,
    lr: float = 0.05,
    seed: int = 0,
) -> TrainedSplit:
    """Train ``model`` cut at ``cut`` on (x, y) by split learning (one client, one epoch per round).

    ``config`` picks the defenses by the keys a run uses (``[privacy]``, ``[activation_noise]``;
    default: none); its model and training sections are not read, the arguments are.
    """
    config = config or ExperimentConfig()
    input_shape = tuple(x.shape[1:])
    client, server = segments(model, cut, input_shape, num_classes, seed=seed)
    state = SplitServerState(
        server,
        sample_shape=cut_shape(client, input_shape),
        num_classes=num_classes,
        lr=lr,
        momentum=0.9,
        device="cpu",
        model_name=model,
        cut=cut,
    )
    # one noise generator for the whole life of the split (training, evaluation, the recorded round)
    release = activation_release(config.activation_noise, seed=seed)
    trained = TrainedSplit(client, state, release, model, cut, input_shape, num_classes, config)
    for rnd in range(1, epochs + 1):
        _train_round(
            trained,
            client,
            x,
            y,
            trained.channel(rnd),
            config=config,
            release=release,
            batch_size=batch_size,
            lr=lr,
            seed=seed + rnd,
        )
    return trained


def record_round(
    trained: TrainedSplit,
    run_path: str | Path,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    rnd: int = 1_000,
    client: str = "0",
    batch_size: int = 32,
    dataset: str = "",
    lr: float = 0.05,
) -> Path:
    """One more training round on the private (x, y) with the server recording; returns the run directory.

    The recorded client segment is the one the server sent at the round's start (what it knows
    white-box); the data owner writes the inputs of the recorded batches to ``ground_truth/``.
    """
    run_path = Path(run_path)
    n_batches = (len(y) + batch_size - 1) // batch_size
    recorder = ObservationRecorder(
        run_path, meta=_run_meta(trained, dataset, trained.config), rounds=(rnd,), max_batches=n_batches
    )
    dp = trained.config.privacy.dp
    if dp.enabled and dp.poisson and len(y) > batch_size:
        # Poisson batches may be empty (no request, yet a forward the tap counts) and repeat samples,
        # so the tap's batch numbers would drift from the server's steps
        raise ValueError(
            f"record_round under Poisson-sampled DP-SGD needs one batch (got {len(y)} samples for batch size "
            f"{batch_size}); record fewer samples or set privacy.dp.poisson = false"
        )
    return _recorded_round(
        trained,
        recorder,
        x,
        y,
        rnd=rnd,
        client=client,
        max_batches=n_batches,
        exchange=False,
        channel=trained.channel(rnd, client),
        config=trained.config,
        release=trained.release,
        batch_size=batch_size,
        lr=lr,
    )


def record_gradient_step(
    trained: TrainedSplit,
    run_path: str | Path,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    rnd: int | None = None,
    client: str = "0",
    lr: float = 0.05,
    config: ExperimentConfig | None = None,
    dataset: str = "",
    seed: int = 0,
) -> Path:
    """One local step of the client on the batch (x, y), the server recording the exchange both ways.

    What gradient inversion needs from an unsecured round, all of it the server's own view: the
    client segment it sent (before), the activations and labels it received, the ``dL/dh`` it
    sent back (the split server's ``exchange_observer``) and the segment the client
    returned (after). The step is SGD without momentum on one batch of ``len(y)`` samples, so
    ``before - after = lr * dL/dW`` when no defense is on. ``config`` (default: the one the split
    was trained with) picks the step's defenses by the keys a run uses: ``privacy.dp.enabled``
    makes it Opacus' DP-SGD step (per-sample clipping to ``privacy.dp.max_grad_norm`` plus Gaussian
    noise), ``[activation_noise]`` and ``privacy.compression`` change what is sent. ``trained``
    keeps the step, as a real client would. ``rnd`` defaults to a round not used before: the server
    answers a repeated (round, client, step) from its retry cache, so two steps must not share one.

    Returns
    -------
    Path
        ``run_path``, with ``observations/`` (read by :func:`attacks.observe.load_observation`,
        ``cut_gradients`` and ``client_update`` included) and ``ground_truth/``.
    """
    if rnd is None:
        rnd = trained.next_round
    trained.next_round = max(trained.next_round, rnd) + 1
    release = trained.release
    if config is None:
        config = trained.config
    else:
        release = activation_release(config.activation_noise, seed=seed)
    meta = {**_run_meta(trained, dataset, config), "local_steps": 1, "client_lr": lr}
    recorder = ObservationRecorder(Path(run_path), meta=meta, rounds=(rnd,), max_batches=1)
    return _recorded_round(
        trained,
        recorder,
        x,
        y,
        rnd=rnd,
        client=client,
        max_batches=1,
        exchange=True,
        channel=trained.channel(rnd, client, config),
        config=config,
        release=release,
        batch_size=len(y),
        lr=lr,
        momentum=0.0,
        seed=seed,
    )


def _run_meta(trained: TrainedSplit, dataset: str, config: ExperimentConfig) -> dict[str, Any]:
    """What a recorded run says about itself: enough for ``fsl attack`` to rebuild the segments."""
    return {
        "model": trained.model,
        "cut": trained.cut,
        "norm": "",
        "dataset": dataset,
        "mode": "sl",
        "num_classes": trained.num_classes,
        "input_shape": list(trained.input_shape),
        "sample_shape": list(trained.state.sample_shape),
        "labels_sent": True,
        "defense": defense_label(config),
    }


def _recorded_round(
    trained: TrainedSplit,
    recorder: ObservationRecorder,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    rnd: int,
    client: str,
    max_batches: int,
    exchange: bool,
    **train: Any,
) -> Path:
    """Round ``rnd`` of :func:`_train_round` with the server recording into ``recorder`` and the data
    owner's tap writing the inputs of the first ``max_batches`` batches to ``ground_truth/``.

    ``exchange``: the server records both ways (its ``exchange_observer``: the activations, labels and
    the ``dL/dh`` it returns, for gradient inversion); otherwise what it receives (its ``observer``).
    """
    start = copy.deepcopy(trained.client.state_dict())  # the segment the server sent: what it knows
    tap = GroundTruthTap(trained.client, max_batches=max_batches)
    if exchange:
        trained.state.exchange_observer = recorder.exchange
    else:
        trained.state.observer = recorder
    try:
        _train_round(trained, tap, x, y, **train)
    finally:
        if exchange:
            trained.state.exchange_observer = None
        else:
            trained.state.observer = None
    recorder.end_round(
        rnd,
        client_segment=start,
        server_segment=trained.state.segment_state_dict(),
        updates=[(client, trained.client.state_dict())],
    )
    tap.save(recorder.run_path, rnd, client)
    return recorder.run_path


def fl_step_observation(
    model: nn.Module,
    model_name: str,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    num_classes: int = 10,
    lr: float = 0.05,
    rnd: int = 1,
    client: str = "0",
) -> Observation:
    """What a federated-learning server sees of one client's local step on the batch (x, y).

    The client trains ``model`` (the global model it received; it keeps the step) with the
    framework's :func:`clients.trainer.train_local`: one epoch of plain SGD with the whole
    batch, so ``before - after = lr * dL/dW``. No activations travel in FL; the observation's
    ``activations`` is a (N, 0) placeholder that carries the batch size, and its keys name the
    rows of (x, y) in the order given (a gradient does not reveal the order).

    Returns
    -------
    Observation
        ``client_segment`` (before) and ``client_update`` (after) of the whole model, ``cut=""``.
    """
    n = len(y)
    before = copy.deepcopy(model.state_dict())
    train_local(model, x, y, TrainOptions(epochs=1, batch_size=n, lr=lr, momentum=0.0))
    return Observation(
        activations=torch.zeros(n, 0),
        model=model_name,
        cut="",
        input_shape=tuple(x.shape[1:]),
        num_classes=num_classes,
        client_segment=before,
        client_update=copy.deepcopy(model.state_dict()),
        keys=tuple(sample_keys(rnd, client, 1, n)),
    )


def ushaped_label_run(
    run_path: str | Path,
    x: torch.Tensor,
    y: torch.Tensor,
    x_private: torch.Tensor,
    y_private: torch.Tensor,
    *,
    cut: str = "conv1",
    top_cut: str = "fc1",
    epochs: int = 2,
    batch_size: int = 32,
    lr: float = 0.05,
    seed: int = 0,
    dataset: str = "",
) -> Path:
    """U-shaped split training in one process, then one recorded round on the private data.

    The client keeps the ``cnn`` blocks up to ``cut`` and after ``top_cut`` plus the loss; the
    server holds the middle and sees, per batch, its input activations and the gradient
    ``dL/dz`` of its output ``z`` (labels never travel). The three segments exchange plain tensors
    in this process and the recorder is handed the server's view of each step directly.
    """
    from fsl.models import build_model

    input_shape = tuple(x.shape[1:])
    model = build_model("cnn", input_shape, int(y.max()) + 1, seed=seed)
    names = [n for n, _ in model.named_children()]
    i, j = names.index(cut) + 1, names.index(top_cut) + 1
    blocks = list(model.children())
    bottom, middle, top = nn.Sequential(*blocks[:i]), nn.Sequential(*blocks[i:j]), nn.Sequential(*blocks[j:])
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)

    def step(xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = bottom(xb)  # client: (B, ...) up
        h_srv = h.detach().requires_grad_(True)
        z = middle(h_srv)  # server: (B, D) down
        z_cli = z.detach().requires_grad_(True)
        loss = nn.functional.cross_entropy(top(z_cli), yb)  # client: labels stay here
        opt.zero_grad(set_to_none=True)
        loss.backward()
        g = z_cli.grad  # (B, D) up: what the server receives
        assert g is not None
        z.backward(g)
        assert h_srv.grad is not None
        h.backward(h_srv.grad)
        opt.step()
        return h.detach(), z.detach(), g.detach()

    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for k in range(0, len(y), batch_size):
            idx = perm[k : k + batch_size]
            step(x[idx], y[idx])
    n_batches = (len(y_private) + batch_size - 1) // batch_size
    rnd = 1_000
    recorder = ObservationRecorder(
        Path(run_path),
        meta={
            "model": "cnn",
            "cut": cut,
            "top_cut": top_cut,
            "norm": "",
            "dataset": dataset,
            "mode": "ushaped",
            "num_classes": int(y.max()) + 1,
            "input_shape": list(input_shape),
            "labels_sent": False,
        },
        rounds=(rnd,),
        max_batches=n_batches,
    )
    inputs: dict[int, torch.Tensor] = {}
    labels: dict[int, torch.Tensor] = {}
    for s, k in enumerate(range(0, len(y_private), batch_size), start=1):
        xb, yb = x_private[k : k + batch_size], y_private[k : k + batch_size]
        h, z, g = step(xb, yb)
        recorder.record(rnd, "0", s, h, gradients=g, server_outputs=z)
        inputs[s], labels[s] = xb, yb
    recorder.end_round(rnd, client_segment=None, server_segment=middle.state_dict())
    from attacks.ground_truth import write_ground_truth

    write_ground_truth(run_path, rnd, "0", inputs, labels)
    return Path(run_path)
