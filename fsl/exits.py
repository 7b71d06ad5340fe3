"""Multi-exit models: an exit classifier after each cut point, trained jointly with the model.

An exit turns a cut point into a place where a request may *stop*: the device runs its
segment, looks at the exit's confidence and answers locally when it is sure enough, and
only otherwise sends the smashed activations on. ``add_exits`` wraps each block at a cut
in an :class:`ExitBlock`, which returns the block's output unchanged (so splitting, the
wire and the server segment work as before) and keeps the logits of its exit head from
the last forward. Whoever holds the labels next to a segment adds :func:`exit_loss`:

* the client, for the exits in its own segment (every mode except where labels never
  reach the client, which does not happen here: clients always own their labels);
* the split server, for exits in the server segment (it receives labels in every mode but
  the U-shaped one, where the middle's exits stay untrained: the server has no labels);
* ``fl`` and ``central`` train the whole multi-exit model in one place.

The final classifier is the model's own last block; exits are named by their cut.

:func:`add_exits` takes an ``nn.Sequential``; :func:`add_exits_at` puts exits inside any model at
module paths (``bert.encoder.layer.1``: after the second encoder layer of a BERT), for whole-model
training and inference in one process (:func:`all_exit_logits` takes token inputs too). A
transformer's exit reads the mean of its real tokens' states (:class:`TokenMeanHead`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fsl.data import Inputs, num_samples, take, trim_padding
from fsl.graphsplit import GraphSegment
from fsl.models import run_model

__all__ = [
    "ExitBlock",
    "TokenMeanHead",
    "add_exits",
    "add_exits_at",
    "all_exit_logits",
    "exit_head",
    "exit_logits",
    "exit_loss",
    "exit_name",
    "exit_loss_per_sample",
    "exit_names",
    "exit_points",
    "has_exits",
    "token_mask",
    "token_mean",
]

FINAL = "final"


def token_mask(attention_mask: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` float: 1 for the real tokens of hidden states ``h`` ``(B, T, D)``, 0 for padding.

    ``attention_mask`` is what a transformer layer is given: ``None`` (no padding in the batch), a
    ``(B, 1, T, T)`` mask (bool: True where attention may look; float: 0 there, a large negative
    number elsewhere), of which the [CLS] query's row says which keys are real, or a plain
    ``(B, T)`` mask (1 for real tokens).
    """
    if attention_mask is None:
        return torch.ones(h.shape[:2], dtype=h.dtype, device=h.device)
    m = attention_mask[:, 0, 0, :] if attention_mask.dim() == 4 else attention_mask  # (B, T)
    real = m if m.dtype == torch.bool else (m == 0 if attention_mask.dim() == 4 else m != 0)
    return real.to(h.dtype)


class TokenMeanHead(nn.Module):
    """A transformer layer's exit: the mean of the real tokens' hidden states through a linear classifier.

    Mean pooling is how all-MiniLM-L6-v2 was trained to summarise a text, and it holds the topic
    early: a linear probe on the frozen model's states after layer 2 told the topic of 66% of the
    fortunes test texts from the mean and 45% from the [CLS] state. The head is given the layer's
    attention mask (:class:`ExitBlock` passes it), so padding never enters the mean.
    """

    reads_attention_mask = True

    def __init__(self, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(token_mean(h, attention_mask))  # (B, num_classes)
        return logits


def token_mean(h: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, D)`` mean of the real tokens' states in ``h`` ``(B, T, D)`` (see :func:`token_mask`)."""
    keep = token_mask(attention_mask, h).unsqueeze(-1)  # (B, T, 1)
    return (h * keep).sum(1) / keep.sum(1).clamp_min(1.0)


def exit_head(sample_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A small classifier on a block's output of per-sample shape ``sample_shape``.

    Feature maps (C, H, W) get a 3x3 conv, a 4x4 average pool and a linear layer (a few
    thousand multiply-adds per sample: cheap next to the blocks themselves); token states
    (T, D) a :class:`TokenMeanHead`; flat features (D,) a linear layer.
    """
    if len(sample_shape) == 3:
        c = sample_shape[0]
        width = max(16, c)
        return nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1),  # (B, width, H, W)
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),  # (B, width, 4, 4)
            nn.Flatten(),
            nn.Linear(width * 16, num_classes),  # (B, num_classes)
        )
    if len(sample_shape) == 2:
        return TokenMeanHead(sample_shape[1], num_classes)
    if len(sample_shape) == 1:
        return nn.Linear(sample_shape[0], num_classes)
    raise ValueError(f"no exit head for block outputs of per-sample shape {sample_shape}")


class ExitBlock(nn.Module):
    """``body`` followed by a side exit ``head``; forward returns ``body(x)`` and keeps the exit's logits.

    Every argument goes to ``body`` (a transformer layer takes the attention mask); when ``body``
    returns a tuple the head reads its first element. A head with ``reads_attention_mask`` is
    given the body's attention mask too (its second positional argument, or ``attention_mask=``;
    a block given none, such as a transformer's embeddings, has the mean over every position).
    ``name`` names the exit (default: the block's own name in its parent).
    """

    def __init__(self, body: nn.Module, head: nn.Module, name: str | None = None) -> None:
        super().__init__()
        self.body = body
        self.head = head
        self.exit_name = name
        self.logits: torch.Tensor | None = None  # (B, num_classes) from the last forward

    def __getstate__(self) -> dict[str, object]:
        # copies (server replicas, checkpoints) never carry the last batch's logits and their graph
        state = dict(super().__getstate__())  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        state["logits"] = None
        return state

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # (a Hugging Face model calls some blocks, its embeddings among them, by keyword only)
        out = self.body(*args, **kwargs)  # (B, ...) the block's output, what travels if this is the cut
        h = out[0] if isinstance(out, tuple) else out
        if getattr(self.head, "reads_attention_mask", False):
            mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")  # None: every token is real
            self.logits = self.head(h, mask)  # (B, num_classes)
        else:
            self.logits = self.head(h)  # (B, num_classes)
        return out


def add_exits(
    model: nn.Sequential,
    input_shape: tuple[int, ...],
    num_classes: int,
    at: tuple[str, ...],
    seed: int | None = None,
) -> nn.Sequential:
    """``model`` with an exit head after each block named in ``at`` (the blocks are shared, not copied).

    Every name must be a block of ``model`` other than the last (the last block is the
    final classifier). With ``seed`` the heads' initial weights are reproducible.
    """
    names = [n for n, _ in model.named_children()]
    bad = [a for a in at if a not in names[:-1]]
    if bad:
        raise ValueError(f"exits at {bad}: exits go after one of the blocks {names[:-1]}")
    blocks: list[tuple[str, nn.Module]] = []
    x = torch.zeros(1, *input_shape)
    was = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed + 7919)
        with torch.no_grad():
            for name, block in model.named_children():
                x = block(x)
                if name in at:
                    blocks.append((name, ExitBlock(block, exit_head(tuple(x.shape[1:]), num_classes), name)))
                else:
                    blocks.append((name, block))
    out = nn.Sequential(OrderedDict(blocks))
    out.train(was)
    model.train(was)
    return out


def add_exits_at(
    model: nn.Module,
    at: Sequence[str],
    num_classes: int,
    example: torch.Tensor | Mapping[str, torch.Tensor],
    seed: int | None = None,
) -> nn.Module:
    """``model`` with an exit head after each submodule at the module paths ``at``, in place.

    Each submodule is wrapped in an :class:`ExitBlock` named by its path (its parameters move one
    level down, ``<path>.body.*``; the head's are ``<path>.head.*``); the head's shape follows
    what the submodule returns on ``example`` (a batch of inputs, a tensor or named tensors).
    The model's output does not change. With ``seed`` the heads' initial weights are reproducible.
    A submodule that returns token states must be given the attention mask (see :func:`exit_points`).
    """
    probed = _probe(model, at, example)
    missing = [a for a in at if a not in probed]
    if missing:
        raise ValueError(f"exits at {missing}: these submodules do not run in the model's forward")
    blind = [a for a in at if not probed[a][1]]
    if blind:
        raise ValueError(
            f"exits at {blind}: these submodules return token states but are not given the attention mask, so an "
            "exit there would average the padding too and answer differently for the same text in another batch; "
            "put the exit after a layer that takes the mask (fsl.exits.exit_points lists where one can go)"
        )
    modules = dict(model.named_modules())
    was = model.training
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed + 7919)
        for a in at:
            parent, _, child = a.rpartition(".")
            block = ExitBlock(modules[a], exit_head(probed[a][0], num_classes), a).train(was)
            model.get_submodule(parent).add_module(child, block)  # replaces the submodule (a ModuleList item too)
    return model


def exit_points(
    model: nn.Module, at: Sequence[str], example: torch.Tensor | Mapping[str, torch.Tensor]
) -> tuple[str, ...]:
    """The module paths of ``at`` where :func:`add_exits_at` can put an exit, in the order given.

    Those that run in ``model``'s forward on ``example`` and, where they return token states, are
    given the attention mask (a transformer's embeddings are not: the mean there would take in the
    padding, so an exit's answer would depend on the longest text of its batch).
    """
    probed = _probe(model, at, example)
    return tuple(a for a in at if a in probed and probed[a][1])


def _probe(
    model: nn.Module, at: Sequence[str], example: torch.Tensor | Mapping[str, torch.Tensor]
) -> dict[str, tuple[tuple[int, ...], bool]]:
    """For each path of ``at`` that runs on ``example``: (per-sample shape of what it returns,
    whether an exit there sees which tokens are real: True unless it returns token states without
    being given an attention mask)."""
    modules = dict(model.named_modules())
    bad = [a for a in at if a not in modules or not a or isinstance(modules[a], ExitBlock)]
    if bad:
        raise ValueError(f"exits at {bad}: each must be the path of a submodule without an exit (fsl cuts MODEL)")
    got: dict[str, tuple[tuple[int, ...], bool]] = {}
    masked: dict[str, bool] = {}

    def keep(path: str) -> tuple[Any, Any]:
        def pre(_m: nn.Module, args: Any, kwargs: Any) -> None:
            # what ExitBlock hands a head that reads the mask: the second positional argument or the
            # keyword (None in a batch without padding: then every token is real)
            masked[path] = len(args) > 1 or "attention_mask" in kwargs

        def post(_m: nn.Module, _args: Any, out: Any) -> None:
            shape = tuple((out[0] if isinstance(out, tuple) else out).shape[1:])
            got[path] = (shape, len(shape) != 2 or masked[path])

        return pre, post

    handles = []
    for a in at:
        pre, post = keep(a)
        handles.append(modules[a].register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(modules[a].register_forward_hook(post))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            run_model(model, example)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return got


def exit_name(path: str, block: ExitBlock) -> str:
    """The name of the exit ``block`` at module path ``path``: its own, else the block's name in its parent."""
    return getattr(block, "exit_name", None) or path.rsplit(".", 1)[-1]


def has_exits(module: nn.Module) -> bool:
    return bool(exit_names(module))


def exit_names(module: nn.Module) -> list[str]:
    """Names of the exits in ``module`` (a model or a segment, traced ones too), shallow to deep."""
    out: list[str] = []
    for n, m in module.named_modules():
        if isinstance(m, ExitBlock):
            out.append(exit_name(n, m))
        elif isinstance(m, GraphSegment):
            out.extend(m.exits)
    return out


def exit_logits(module: nn.Module) -> dict[str, torch.Tensor]:
    """The exit logits of ``module``'s last forward, by exit name.

    A segment of a graph split (:class:`fsl.graphsplit.GraphSegment`) runs its exits' heads inside its
    graph and keeps their logits itself; a sequential segment's are in its :class:`ExitBlock` modules.
    """
    out: dict[str, torch.Tensor] = {}
    for n, m in module.named_modules():  # (wrappers such as Opacus' GradSampleModule nest the blocks)
        if isinstance(m, ExitBlock) and m.logits is not None:
            out[exit_name(n, m)] = m.logits
        elif isinstance(m, GraphSegment):
            out.update(m.exit_outputs)
    return out


def exit_loss(module: nn.Module, y: torch.Tensor, weight: float = 1.0) -> torch.Tensor | None:
    """``weight`` times the summed mean cross entropy of ``module``'s exits after its last forward.

    ``None`` when the segment has no exits, so callers add nothing (and change nothing) then.
    """
    logits = exit_logits(module)
    if not logits:
        return None
    total = sum(nn.functional.cross_entropy(z, y) for z in logits.values())
    return weight * total  # type: ignore[return-value]


def exit_loss_per_sample(module: nn.Module, y: torch.Tensor, weight: float = 1.0) -> torch.Tensor | None:
    """Per-sample form of :func:`exit_loss`: ``(N,)`` weighted summed cross entropies, or ``None``."""
    logits = exit_logits(module)
    if not logits:
        return None
    total = sum(nn.functional.cross_entropy(z, y, reduction="none") for z in logits.values())
    return weight * total  # type: ignore[return-value]


@torch.no_grad()
def all_exit_logits(model: nn.Module, x: Inputs, batch_size: int = 1024) -> dict[str, torch.Tensor]:
    """Logits of every exit and of the final classifier (key ``"final"``) on ``x``, in eval mode.

    ``x`` is a tensor or named tensors (token ids and attention mask: each batch is cut to its
    longest sequence, which changes no logit)."""
    was = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    total = num_samples(x)
    try:
        for i in range(0, total, batch_size):
            xb, _ = trim_padding(take(x, torch.arange(i, min(i + batch_size, total))), torch.empty(0))
            final = run_model(model, xb)  # (B, num_classes)
            for name, z in exit_logits(model).items():
                parts.setdefault(name, []).append(z)
            parts.setdefault(FINAL, []).append(final)
    finally:
        model.train(was)
    return {name: torch.cat(v) for name, v in parts.items()}
