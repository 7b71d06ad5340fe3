"""``fsha`` — feature-space hijacking by a malicious split server (Pasquini, Ateniese, Bernaschi, CCS 2021).

This is a training-time attack, so it runs as a *malicious-server mode* of split
training, entirely inside the attack suite (the honest :class:`SplitServerState` is
untouched). :class:`HijackingServer` speaks the real data plane (it implements the same
``train``/``infer``/``info`` calls, through the real codec, so the client runs the
framework's own honest :func:`clients.trainer.train_segment`), but instead of the task
loss it returns the gradient of an adversarial loss:

* on public data ``x_pub`` it trains a pilot encoder ``f~`` and its decoder ``f~^-1`` as an
  autoencoder (the "target feature space");
* a discriminator ``D`` (WGAN-GP) learns to tell the client's ``f(x_priv)`` from ``f~(x_pub)``;
* the gradient sent to the client is ``d(-D(h))/dh``: the client's segment is steered into the
  pilot's feature space, where ``f~^-1`` inverts it.

Every ``eval_every`` steps the server reconstructs the batch it just received,
``f~^-1(h)``; the scorer compares those with the client's inputs of the same steps,
giving reconstruction error against iterations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from attacks.base import Progress, progress_or_silent
from attacks.inverse_network import Decoder
from attacks.models import segments
from fsl.models import cut_shape
from fsl.wire import codec
from fsl.wire import dataplane_pb2 as pb

__all__ = ["HijackingServer", "StepTap", "batch_plan", "hijack", "run_fsha"]


class _Critic(nn.Module):
    def __init__(self, sample_shape: tuple[int, ...], width: int = 64) -> None:
        super().__init__()
        if len(sample_shape) == 3:
            c = sample_shape[0]
            self.net: nn.Module = nn.Sequential(
                nn.Conv2d(c, width, 3, stride=2, padding=1),
                nn.LeakyReLU(0.2),
                nn.Conv2d(width, width, 3, stride=2, padding=1),
                nn.LeakyReLU(0.2),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(width, 1),
            )
        else:
            self.net = nn.Sequential(
                nn.Flatten(), nn.Linear(sample_shape[0], 256), nn.LeakyReLU(0.2), nn.Linear(256, 1)
            )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h).squeeze(1)


@dataclass
class HijackingServer:
    """A malicious data-plane server: answers ``train`` with the hijacking gradient."""

    model: str
    cut: str
    input_shape: tuple[int, ...]
    public: torch.Tensor  # (M, C, H, W) the attacker's public data, in [0, 1]
    num_classes: int = 10
    lr: float = 1e-4
    gp: float = 10.0
    seed: int = 0
    eval_every: int = 50
    reconstructions: dict[int, torch.Tensor] = field(default_factory=dict)
    steps: int = 0
    # the paper's settings (``paper_server``); the defaults keep this module's own smaller attacker
    nets: tuple[nn.Module, nn.Module, nn.Module] | None = None  # (pilot, decoder, critic) instead of the defaults
    lr_pilot: float | None = None  # Adam on pilot + decoder (default lr * 10)
    lr_critic: float | None = None  # Adam on the critic (default lr * 10, betas (0.5, 0.9))
    gp_per_channel: bool = False  # the authors' code: gradient norms over the spatial axes, one per channel
    simultaneous: bool = False  # every gradient from the same forward pass, before any update (authors' code)
    grad_scale: float = 1.0  # the attacker scales its adversarial loss (the paper's alpha_2 against dCor)
    pixel_range: tuple[float, float] = (0.0, 1.0)  # reconstructions are clamped to it
    # what a gRPC SplitServer reads of the state it serves: the attacker answers on the real data plane
    max_message_bytes: int = 64 * 1024 * 1024
    torch_device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.pilot: nn.Module
            if self.nets is None:
                self.pilot, _ = segments(self.model, self.cut, self.input_shape, self.num_classes, seed=self.seed + 7)
                self.sample_shape = cut_shape(self.pilot, self.input_shape)
                self.decoder: nn.Module = Decoder(self.sample_shape, self.input_shape)
                self.critic: nn.Module = _Critic(self.sample_shape)
            else:
                self.pilot, self.decoder, self.critic = self.nets
                self.sample_shape = cut_shape(self.pilot, self.input_shape)
                self.critic(torch.zeros(2, *self.sample_shape))  # materialise lazy layers before the optimizer
        lr_ae = self.lr * 10 if self.lr_pilot is None else self.lr_pilot
        self.opt_ae = torch.optim.Adam([*self.pilot.parameters(), *self.decoder.parameters()], lr=lr_ae)
        if self.lr_critic is None:
            self.opt_d = torch.optim.Adam(self.critic.parameters(), lr=self.lr * 10, betas=(0.5, 0.9))
        else:
            self.opt_d = torch.optim.Adam(self.critic.parameters(), lr=self.lr_critic)
        self.gen = torch.Generator().manual_seed(self.seed)

    def _public_batch(self, n: int) -> torch.Tensor:
        return self.public[torch.randint(len(self.public), (n,), generator=self.gen)]

    def train(self, request: pb.TrainRequest) -> pb.TrainReply:
        h = codec.decode(request.activations, name="activations").float().requires_grad_(True)  # (B, ...)
        self.steps += 1
        x_pub = self._public_batch(h.shape[0])
        grad = self._simultaneous_step(h, x_pub) if self.simultaneous else self._sequential_step(h, x_pub)
        if self.steps % self.eval_every == 0 or self.steps == 1:
            with torch.no_grad():
                self.reconstructions[self.steps] = self.decoder(h.detach()).clamp(*self.pixel_range)
        return pb.TrainReply(
            grad=codec.encode(grad, codec.DTYPES[request.activations.dtype]),
            loss=self._client_loss,
            correct=0,
            server_step=self.steps,
        )

    def _penalty(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """WGAN-GP: the critic's gradient norm on random mixes of the two feature sets, pulled to 1."""
        eps = torch.rand(fake.shape[0], *[1] * (fake.ndim - 1), generator=self.gen)
        mix = (eps * real + (1 - eps) * fake).requires_grad_(True)
        (gmix,) = torch.autograd.grad(self.critic(mix).sum(), mix, create_graph=True)
        norms = gmix.flatten(2).norm(dim=2) if self.gp_per_channel and gmix.ndim == 4 else gmix.flatten(1).norm(dim=1)
        penalty: torch.Tensor = ((norms - 1) ** 2).mean()
        return penalty

    def _sequential_step(self, h: torch.Tensor, x_pub: torch.Tensor) -> torch.Tensor:
        # 1. the pilot autoencoder on public data
        ae_loss = F.mse_loss(self.decoder(self.pilot(x_pub)), x_pub)
        self.opt_ae.zero_grad(set_to_none=True)
        ae_loss.backward()
        self.opt_ae.step()
        # 2. the critic: pilot features are "real", the client's are "fake" (WGAN-GP)
        with torch.no_grad():
            z_pub = self.pilot(x_pub)
        fake = h.detach()
        d_loss = self.critic(fake).mean() - self.critic(z_pub).mean() + self.gp * self._penalty(z_pub, fake)
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()
        # 3. the hijacking gradient for the client: make f(x_priv) look like pilot features
        client_loss = -self.critic(h).mean() * self.grad_scale
        (grad,) = torch.autograd.grad(client_loss, h)
        self._client_loss = float(client_loss.detach())
        return grad

    def _simultaneous_step(self, h: torch.Tensor, x_pub: torch.Tensor) -> torch.Tensor:
        """As the authors' code: the three losses from one forward pass, then the three updates."""
        z_pub = self.pilot(x_pub)
        ae_loss = F.mse_loss(self.decoder(z_pub), x_pub)
        score_priv = self.critic(h)
        client_loss = -score_priv.mean() * self.grad_scale
        (grad,) = torch.autograd.grad(client_loss, h, retain_graph=True)
        real, fake = z_pub.detach(), h.detach()
        d_loss = score_priv.mean() - self.critic(real).mean() + self.gp * self._penalty(real, fake)
        self.opt_ae.zero_grad(set_to_none=True)
        self.opt_d.zero_grad(set_to_none=True)
        ae_loss.backward()
        # only the critic's parameters take d_loss's gradient (h is the client's; its grad is already out)
        d_grads = torch.autograd.grad(d_loss, list(self.critic.parameters()))
        for p, g in zip(self.critic.parameters(), d_grads, strict=True):
            p.grad = g
        self.opt_ae.step()
        self.opt_d.step()
        self._client_loss = float(client_loss.detach())
        return grad

    def infer(self, request: pb.InferRequest) -> pb.InferReply:
        raise NotImplementedError("the hijacking server only trains")

    def info(self) -> pb.InfoReply:
        return pb.InfoReply(model=self.model, cut=self.cut, sample_shape=list(self.sample_shape), mode="fsha")


class StepTap(nn.Module):
    """The data owner's record of its inputs at every ``every``-th training step (for scoring only)."""

    def __init__(self, segment: nn.Module, every: int) -> None:
        super().__init__()
        self.segment, self.every, self.calls = segment, every, 0
        self.inputs: dict[int, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls % self.every == 0 or self.calls == 1:
            self.inputs[self.calls] = x.detach().clone()
        return self.segment(x)


def run_fsha(
    model: str,
    cut: str,
    x_private: torch.Tensor,
    y_private: torch.Tensor,
    x_public: torch.Tensor,
    *,
    iters: int = 1000,
    batch_size: int = 64,
    client_lr: float = 0.05,
    server_lr: float = 1e-3,
    eval_every: int = 50,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Split training of an honest client against the hijacking server for ``iters`` steps.

    Returns ``curve`` (step, mse, psnr, ssim of the server's reconstruction of that step's batch),
    and the ``original``/``reconstructed`` batch of the last evaluated step.
    """
    from attacks.metrics import image_scores
    from clients.trainer import TrainHooks, TrainOptions, train_segment
    from fsl.channel import ChannelIdentity, InMemoryChannel

    report = progress_or_silent(progress)
    input_shape = tuple(x_private.shape[1:])
    client, _ = segments(model, cut, input_shape, seed=seed)
    server = HijackingServer(model, cut, input_shape, x_public, lr=server_lr, seed=seed, eval_every=eval_every)
    tap = StepTap(client, eval_every)
    channel = InMemoryChannel(server=server, identity=ChannelIdentity(run_id="fsha", round=1, client_id="victim"))
    per_epoch = (len(y_private) + batch_size - 1) // batch_size
    epochs = (iters + per_epoch - 1) // per_epoch
    done = [0]

    def on_batch(_n: int) -> None:
        done[0] += 1
        if done[0] % 10 == 0:
            report(done[0], epochs * per_epoch, "fsha: hijacked split training")

    # the client is honest: the framework's trainer, momentum-free SGD as in the paper's setting
    train_segment(
        tap,
        x_private,
        y_private,
        channel,
        TrainOptions(epochs=epochs, batch_size=batch_size, lr=client_lr, momentum=0.0, seed=seed),
        TrainHooks(on_batch=on_batch),
    )
    curve = []
    last = max(s for s in server.reconstructions if s in tap.inputs)
    for s in sorted(server.reconstructions):
        if s in tap.inputs:
            sc = image_scores(server.reconstructions[s], tap.inputs[s])
            curve.append({"step": s, **{k: float(v.mean()) for k, v in sc.items()}})
    return {"curve": curve, "original": tap.inputs[last], "reconstructed": server.reconstructions[last], "step": last}


def batch_plan(n: int, batch_size: int, iters: int, seed: int = 0) -> list[torch.Tensor]:
    """``iters`` full batches of indices into ``n`` samples: reshuffled every pass, remainder dropped."""
    gen = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    while len(out) < iters:
        perm = torch.randperm(n, generator=gen)
        out += [perm[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
    return out[:iters]


class PenaltyStepFirst:
    """The defended client of the authors' code (``FSHA_distcor.py``): one step of ``optimizer`` on
    the penalty (dCor) alone, then one on the gradient the server returned, both gradients taken at
    the same weights. The framework's NoPeek takes one step on their sum. The penalty's gradient
    needs a second forward of the client on the batch (``x``, set before each step), which also
    updates batch-norm running statistics a second time; the training-mode outputs do not use them."""

    def __init__(self, optimizer: torch.optim.Optimizer, client: nn.Module, penalty: Any) -> None:
        self.optimizer, self.client, self.penalty = optimizer, client, penalty
        self.params = [p for p in client.parameters() if p.requires_grad]
        self.x: torch.Tensor | None = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        if self.x is None:
            raise RuntimeError("PenaltyStepFirst.step before the batch's inputs were set")
        returned = [p.grad for p in self.params]  # the server's gradient, backpropagated by the trainer
        for p in self.params:
            p.grad = None
        with torch.enable_grad():
            self.penalty(self.x, self.client(self.x).flatten(1)).backward()
        self.optimizer.step()
        for p, g in zip(self.params, returned, strict=True):
            p.grad = g
        self.optimizer.step()


def hijack(
    client: nn.Module,
    server: HijackingServer,
    x_private: torch.Tensor,
    y_private: torch.Tensor,
    *,
    iters: int,
    batch_size: int = 64,
    optimizer: torch.optim.Optimizer | None = None,
    penalty: Any = None,
    penalty_steps: str = "joint",
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """``iters`` steps of the framework's honest split trainer on ``client`` against ``server``.

    The client may bring its own ``optimizer`` (default: the trainer's SGD) and a ``penalty(x, h)``
    (a NoPeek defense), applied as the framework does (``penalty_steps="joint"``: one step on the
    penalty plus the returned gradient) or as the authors' client (``"separate"``: one step on each,
    :class:`PenaltyStepFirst`; needs ``optimizer``). Every ``server.eval_every`` steps the server's reconstruction of the batch it
    just received is scored against that batch (mean squared error over all pixels, in the pixel
    range of ``x_private``) and then dropped, so a long run holds one batch at a time.
    Returns ``curve`` [[step, mse]], ``original`` and ``reconstructed`` (the last scored batch),
    ``steps`` and ``wall_s``.
    """
    import time

    from clients.trainer import TrainHooks, TrainOptions, train_segment
    from fsl.channel import ChannelIdentity, InMemoryChannel

    report = progress_or_silent(progress)
    channel = InMemoryChannel(server=server, identity=ChannelIdentity(run_id="fsha", round=1, client_id="victim"))
    plan = batch_plan(len(y_private), batch_size, iters, seed)
    every = server.eval_every
    step = [0]
    pending: dict[int, torch.Tensor] = {}
    curve: list[list[float]] = []
    last: dict[str, torch.Tensor] = {}

    if penalty_steps not in ("joint", "separate"):
        raise ValueError(f"penalty_steps must be 'joint' or 'separate', not {penalty_steps!r}")
    separate = None
    if penalty is not None and penalty_steps == "separate":
        if optimizer is None:
            raise ValueError("penalty_steps='separate' needs the client's optimizer")
        separate = PenaltyStepFirst(optimizer, client, penalty)
        penalty = None  # the trainer's own joint penalty is off: the stepper applies it

    def seen(x: torch.Tensor) -> None:  # the data owner's own record of its batch, for scoring only
        if separate is not None:
            separate.x = x
        step[0] += 1
        if step[0] % every == 0 or step[0] == 1:
            pending[step[0]] = x.detach().clone()

    def on_batch(_n: int) -> None:
        s = step[0]
        if s in pending:
            original, reconstructed = pending.pop(s), server.reconstructions.pop(s)
            curve.append([s, float(F.mse_loss(reconstructed, original))])
            last.update(original=original, reconstructed=reconstructed)
        if s % 10 == 0:
            report(s, iters, "fsha: hijacked split training")

    t0 = time.perf_counter()
    train_segment(
        client,
        x_private,
        y_private,
        channel,
        TrainOptions(epochs=1, batch_size=batch_size, momentum=0.0, seed=seed),
        TrainHooks(
            optimizer=separate or optimizer, batches=lambda: plan, penalty=penalty, inputs=seen, on_batch=on_batch
        ),
    )
    wall = time.perf_counter() - t0
    return {"curve": curve, "steps": step[0], "wall_s": wall, **last}
