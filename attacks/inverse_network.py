"""``inverse-network`` — black-box inversion with a learned decoder (He, Zhang, Lee, ACSAC 2019).

Threat model: the attacker can *query* the client segment (feed inputs, read the
activations) but need not read its weights; it holds auxiliary data (same
distribution, same set, or other data). It queries the segment on the auxiliary
inputs and trains a decoder ``g: h -> x`` on the pairs, then decodes the observed
activations. In FSL the server holds the aggregated segment, so querying is free.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from attacks.base import AttackResult, Observation, Progress, ThreatModel, freeze, progress_or_silent, register
from attacks.models import segments

__all__ = ["Decoder", "InverseNetwork"]


class Decoder(nn.Module):
    """From activations (C, h, w) or (D,) back to an image (C_in, H, W) in [0, 1]."""

    def __init__(self, sample_shape: tuple[int, ...], input_shape: tuple[int, ...], width: int = 64) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        c_in, height, wid = self.input_shape
        if len(sample_shape) == 3:
            self.flat = None
            c, h, _w = sample_shape
            start = c
        else:  # a vector: a linear layer to a quarter-resolution map first
            h = max(1, height // 4)
            self.flat = nn.Sequential(nn.Linear(int(sample_shape[0]), width * h * max(1, wid // 4)), nn.ReLU())
            self.flat_shape = (width, h, max(1, wid // 4))
            start = width
        layers: list[nn.Module] = [nn.Conv2d(start, width, 3, padding=1), nn.ReLU()]
        size = h
        while size < height:  # upsample by 2 until the input's resolution
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
            size *= 2
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, c_in, 3, padding=1)]
        self.body = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.flat is not None:
            h = self.flat(h.flatten(1)).view(-1, *self.flat_shape)
        out = self.body(h)
        if tuple(out.shape[-2:]) != self.input_shape[-2:]:
            out = F.interpolate(out, size=self.input_shape[-2:], mode="bilinear", align_corners=False)
        return torch.sigmoid(out)


@register("inverse-network")
@dataclass
class InverseNetwork:
    """Train a decoder on ``epochs`` passes over the auxiliary data (Adam, ``lr``, batches of ``batch_size``)."""

    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 64
    width: int = 64
    seed: int = 0
    name: str = "inverse-network"
    needs: tuple[str, ...] = ("client_segment", "auxiliary_data")

    def run(self, observation: Observation, threat: ThreatModel, progress: Progress | None = None) -> AttackResult:
        if threat.auxiliary_data is None:
            raise ValueError("inverse-network needs auxiliary data (threat.auxiliary_data)")
        if observation.client_segment is None:
            raise ValueError("inverse-network needs query access to the client segment (the recorded segment)")
        report = progress_or_silent(progress)
        client, _ = segments(
            observation.model, observation.cut, observation.input_shape, observation.num_classes, observation.norm
        )
        client.load_state_dict(observation.client_segment)
        query = freeze(client)  # black box: only forward calls are made on it
        aux = threat.auxiliary_data.float()
        with torch.no_grad():
            feats = torch.cat([query(aux[i : i + 512]) for i in range(0, len(aux), 512)])  # (M, ...) queried
        gen = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            dec = Decoder(tuple(observation.activations.shape[1:]), observation.input_shape, self.width)
        opt = torch.optim.Adam(dec.parameters(), lr=self.lr)
        steps = self.epochs * ((len(aux) + self.batch_size - 1) // self.batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
        done = 0
        for ep in range(self.epochs):
            perm = torch.randperm(len(aux), generator=gen)
            total = 0.0
            for i in range(0, len(aux), self.batch_size):
                idx = perm[i : i + self.batch_size]
                loss = F.mse_loss(dec(feats[idx]), aux[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
                done += 1
            report(done, steps, f"inverse-network: epoch {ep + 1}/{self.epochs}, mse {total / len(aux):.4f}")
        dec.eval()
        with torch.no_grad():
            x = dec(observation.activations.float())
        return AttackResult(reconstructed=x, extra={"decoder_train_mse": total / len(aux)})
