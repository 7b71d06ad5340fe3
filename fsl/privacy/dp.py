"""DP-SGD on the client segment with Opacus, and the accounting that goes with it.

What it protects
----------------
The client-segment *updates* a client returns each round (and so the aggregated segment): every
optimizer step clips each sample's gradient of the client segment to ``max_grad_norm`` and adds
N(0, (noise_multiplier * max_grad_norm)^2) noise to their sum, on Poisson-sampled batches. The
accountant (RDP or PRV) turns (noise_multiplier, sample_rate, steps) into epsilon for a delta,
per client, over every round it trained in.

What it does not protect
------------------------
The smashed activations sent every batch, and the labels sent with them: the server sees those
before any noise is added. Use ``[activation_noise]`` (``fsl/privacy/activation.py``) for the
activations; it is a separate mechanism with its own (per-release) guarantee.

The split
---------
The server's gradient at the cut is passed to ``h.backward`` unchanged and Opacus is told the
server's loss reduction (cross entropy, ``"mean"``): then Opacus rescales by the batch size and the
per-sample gradients are those of each sample's own loss (``tests/test_dp.py`` checks this against a
per-sample loop through the split without Opacus). In a U-shaped split both client segments (bottom
and top) are DP-trained together: one clipping bound over both.

State
-----
Clients are stateless between rounds, so the ServerApp keeps each client's accounting history (a
list of ``(noise_multiplier, sample_rate, steps)``, Opacus' own format) in a :class:`PrivacyLedger`,
recomputes epsilon from it with Opacus' accountant and saves it in every checkpoint.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fsl.training import TrainHooks

__all__ = [
    "DPProblem",
    "DPSession",
    "DPValidationError",
    "PrivacyLedger",
    "compute_epsilon",
    "make_dp_session",
    "noise_for_target",
    "steps_per_epoch",
    "validate_dp_module",
]

History = list[tuple[float, float, int]]


@dataclass(frozen=True)
class DPProblem:
    """One reason a module cannot be trained with DP-SGD, with why it matters and how to fix it."""

    module: str
    why: str
    fix: str

    def __str__(self) -> str:
        return f"{self.module}: {self.why} Fix: {self.fix}"


class DPValidationError(ValueError):
    """A client segment that DP-SGD cannot train; the text lists every problem."""

    def __init__(self, problems: list[DPProblem]) -> None:
        self.problems = problems
        super().__init__("the client segment cannot be trained with DP-SGD:\n" + "\n".join(f"- {p}" for p in problems))


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def validate_dp_module(module: nn.Module) -> list[DPProblem]:
    """Everything that stops ``module`` from being DP-trained (empty list: fine). Uses Opacus' validator too."""
    from opacus.validators import ModuleValidator

    problems: list[DPProblem] = []
    if any(getattr(m, "traced", False) for m in module.modules()):
        return [
            DPProblem(
                "(traced segment)",
                "a segment cut from the model's traced graph runs the graph's operations, not its layers, so "
                "Opacus cannot compute per-sample gradients layer by layer.",
                "cut an nn.Sequential model at one of its top-level blocks, or turn privacy.dp off.",
            )
        ]
    for name, m in module.named_modules():
        if isinstance(m, _BATCH_NORMS):
            problems.append(
                DPProblem(
                    name or type(m).__name__,
                    "BatchNorm normalises with statistics of the whole batch, so one sample's gradient depends on "
                    "the others and per-sample clipping bounds nothing.",
                    "build the model with model.norm = 'group' (GroupNorm), or opacus' ModuleValidator.fix().",
                )
            )
    if not any(p.requires_grad for p in module.parameters()):
        problems.append(
            DPProblem(
                "(segment)",
                "it has no trainable parameters, so there is no update to protect and Opacus cannot attach.",
                "cut the model deeper (model.cut) or turn privacy.dp off.",
            )
        )
    if not problems:  # Opacus' own checks (unsupported layers, buffers, ...)
        for err in ModuleValidator.validate(module, strict=False):
            problems.append(DPProblem(type(err).__name__, str(err), "replace the layer (see opacus.validators)."))
    return problems


def steps_per_epoch(n: int, batch_size: int) -> tuple[float, int]:
    """``(sample_rate, steps)`` of one Poisson-sampled epoch over ``n`` samples, as Opacus computes them."""
    if n <= 0:
        raise ValueError("DP-SGD needs at least one training sample")
    steps = max(1, math.ceil(n / batch_size))  # len(DataLoader(n, batch_size)): Opacus' steps per epoch
    return 1.0 / steps, steps


def _accountant(name: str) -> Any:
    from opacus.accountants import create_accountant

    return create_accountant(mechanism=name)


def compute_epsilon(history: History, delta: float, accountant: str = "rdp") -> float:
    """Epsilon for ``delta`` after the steps in ``history`` (Opacus' accountant; 0 steps -> 0; sigma 0 -> inf)."""
    if not history:
        return 0.0
    if any(sigma <= 0 for sigma, _, steps in history if steps > 0):
        return math.inf
    acc = _accountant(accountant)
    acc.history = [(float(s), float(q), int(k)) for s, q, k in history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RDP warns when the optimal order lies at the edge of its grid
        return float(acc.get_epsilon(delta=delta))


def noise_for_target(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """The noise multiplier that reaches ``target_epsilon`` after ``steps`` steps at ``sample_rate`` (Opacus)."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
        )


@dataclass
class DPSession:
    """A client segment made private for one round: the optimizer and batches to hand to the trainer."""

    optimizer: torch.optim.Optimizer
    loader: Any
    hooks: Any
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    accountant: Any
    steps_before: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    def batches(self) -> Iterator[torch.Tensor]:
        """One Poisson-sampled epoch of sample indices (a batch may be empty)."""
        for (idx,) in self.loader:
            yield idx

    def train_hooks(self) -> TrainHooks:
        """What the client's training loop takes from DP-SGD: its optimizer and its Poisson batches."""
        return TrainHooks(optimizer=self.optimizer, batches=self.batches)

    @property
    def steps(self) -> int:
        """Optimizer steps taken in this session."""
        return sum(k for _, _, k in self.accountant.history)

    def metrics(self, delta: float) -> dict[str, float]:
        """What the client reports; the ServerApp's ledger recomputes epsilon over all rounds from these."""
        return {
            "dp_noise_multiplier": self.noise_multiplier,
            "dp_max_grad_norm": self.max_grad_norm,
            "dp_sample_rate": self.sample_rate,
            "dp_steps": self.steps,
            "dp_round_epsilon": compute_epsilon(self.accountant.history, delta, _name(self.accountant)),
        }

    def close(self) -> None:
        """Detach Opacus' hooks from the segment (its weights are untouched)."""
        self.hooks.cleanup()


def _name(acc: Any) -> str:
    return str(acc.mechanism())


def make_dp_session(
    module: nn.Module,
    n: int,
    *,
    dp: Any,
    batch_size: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    seed: int,
    total_epochs: int,
) -> DPSession:
    """Attach Opacus to ``module`` (in place, no wrapper) for DP-SGD on ``n`` local samples.

    ``dp`` is a :class:`fsl.privacy.config.DPConfig`. With ``dp.target_epsilon > 0`` the noise is chosen so
    that epsilon reaches the target after ``total_epochs`` local epochs (all rounds: conservative when a
    client is not selected every round). The loss reduction is ``"mean"``: the split server's cross entropy.
    """
    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import DataLoader, TensorDataset

    problems = validate_dp_module(module)
    if problems:
        raise DPValidationError(problems)
    sample_rate, steps = steps_per_epoch(n, batch_size)
    sigma = float(dp.noise_multiplier)
    if dp.target_epsilon > 0:
        sigma = noise_for_target(dp.target_epsilon, dp.delta, sample_rate, steps * total_epochs, dp.accountant)
    gen = torch.Generator().manual_seed(seed)
    index_loader = DataLoader(TensorDataset(torch.arange(n)), batch_size=batch_size)
    if dp.poisson:  # each sample joins each batch independently with probability sample_rate
        loader: Any = DPDataLoader.from_data_loader(index_loader, generator=gen)
    else:
        loader = DataLoader(TensorDataset(torch.arange(n)), batch_size=batch_size, shuffle=True, generator=gen)
    opt = torch.optim.SGD(module.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "secure RNG turned off": seeded noise, reproducible, not a CSPRNG
        engine = PrivacyEngine(
            accountant=dp.accountant
        )  # "secure RNG turned off": seeded noise, reproducible, not a CSPRNG
        hooks, dp_opt, loader = engine.make_private(
            module=module,
            optimizer=opt,
            data_loader=loader,
            noise_multiplier=sigma,
            max_grad_norm=dp.max_grad_norm,
            poisson_sampling=False,  # the loader above already samples (seeded); accounting is the same
            loss_reduction="mean",  # = the split server's CrossEntropyLoss
            wrap_model=False,
            noise_generator=torch.Generator().manual_seed(seed + 1),
        )
    return DPSession(dp_opt, loader, hooks, sigma, float(dp.max_grad_norm), sample_rate, engine.accountant)


class PrivacyLedger:
    """Each client's DP-SGD history on the server, epsilon recomputed with Opacus, saved with checkpoints.

    Clients are keyed by their data partition (``partition-id``): the budget belongs to the data, and
    node ids may change when a run resumes.
    """

    def __init__(self, accountant: str = "rdp", delta: float = 1e-5) -> None:
        self.accountant, self.delta = accountant, delta
        self.histories: dict[str, History] = {}
        self.last: dict[str, dict[str, float]] = {}

    def record(self, client: str, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        h = self.histories.setdefault(client, [])
        if steps <= 0:
            return
        if h and h[-1][0] == noise_multiplier and h[-1][1] == sample_rate:
            h[-1] = (noise_multiplier, sample_rate, h[-1][2] + steps)  # what Opacus' accountants do
        else:
            h.append((noise_multiplier, sample_rate, steps))
        self.last[client] = {"noise_multiplier": noise_multiplier, "sample_rate": sample_rate}

    def epsilon(self, client: str) -> float:
        return compute_epsilon(self.histories.get(client, []), self.delta, self.accountant)

    def epsilons(self) -> dict[str, float]:
        return {c: self.epsilon(c) for c in sorted(self.histories, key=_sort_key)}

    def steps(self, client: str) -> int:
        return sum(k for _, _, k in self.histories.get(client, []))

    def state(self) -> dict[str, Any]:
        """JSON-ready state (what a checkpoint stores)."""
        return {
            "accountant": self.accountant,
            "delta": self.delta,
            "histories": {c: [list(t) for t in h] for c, h in self.histories.items()},
        }

    def load(self, state: dict[str, Any] | None) -> None:
        if not state:
            return
        self.histories = {
            str(c): [(float(s), float(q), int(k)) for s, q, k in h] for c, h in state.get("histories", {}).items()
        }
        for c, h in self.histories.items():
            if h:
                self.last[c] = {"noise_multiplier": h[-1][0], "sample_rate": h[-1][1]}

    def summary(self, max_grad_norm: float) -> dict[str, Any]:
        """The ``privacy`` object of ``summary.json`` (epsilon: the largest over clients)."""
        eps = self.epsilons()
        sigmas = sorted({v["noise_multiplier"] for v in self.last.values()})
        rates = sorted({v["sample_rate"] for v in self.last.values()})
        return {
            "mechanism": "dp-sgd",
            "protects": "client-segment updates (what gets aggregated); NOT the activations sent every batch",
            "accountant": self.accountant,
            "noise_multiplier": sigmas[0]
            if len(sigmas) == 1
            else {c: v["noise_multiplier"] for c, v in self.last.items()},
            "max_grad_norm": max_grad_norm,
            "sample_rate": rates[0] if len(rates) == 1 else {c: v["sample_rate"] for c, v in self.last.items()},
            "steps": {c: self.steps(c) for c in eps},
            "delta": self.delta,
            "epsilon": max(eps.values()) if eps else 0.0,
            "epsilon_per_client": eps,
            "history": {c: [list(t) for t in h] for c, h in self.histories.items()},
        }


def _sort_key(c: str) -> tuple[int, str]:
    return (int(c), c) if c.isdigit() else (1 << 30, c)
