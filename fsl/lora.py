"""LoRA on either segment of a split model, with ``peft``, and the rule for what travels.

Adapters are put into the whole model before it is split (``peft.inject_adapter_in_model``, not
``get_peft_model``: no wrapper around the model, so every module keeps its path and every cut its
name). A targeted layer becomes peft's LoRA layer at the same path; its own weights move one level
down (``...query.weight`` is then ``...query.base_layer.weight``) and its adapters sit beside them
(``...query.lora_A.default.weight``, ``...query.lora_B.default.weight``). The base weights are
frozen; the adapters and the modules named ``trainable`` (the task head) train, and with
``segments = "client"`` or ``"server"`` only that side gets adapters while the other side trains
all its weights.

What travels is what trains: :func:`carried_state` is a module's state dict without its frozen
parameters. The client segments Flower sends and aggregates, the checkpoints of both segments and
the segments pushed to standalone split servers hold only that; every node builds the frozen base
itself from the same pretrained weights, which :func:`base_digest` fingerprints so that a node whose
base differs is refused instead of silently training a different model. For a model without
frozen parameters (no LoRA) the carried state is the whole state dict.

:func:`merge_lora` folds the adapters into the base weights (``W + B @ A * alpha / r``) and puts the
plain layers back, so a merged model has the original model's modules and parameter names.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "ADAPTER",
    "adapter_names",
    "BaseMismatch",
    "base_digest",
    "carried_state",
    "check_base",
    "frozen_names",
    "inject_lora",
    "load_carried",
    "lora_targets",
    "merge_lora",
    "original_name",
]

ADAPTER = "default"  # peft's name for the one adapter each layer holds

# what "all-linear" covers: torch's linear layer and the transposed one of GPT-2 in transformers
_LINEAR_NAMES = ("Linear", "Conv1D")


def _peft() -> Any:
    try:
        import peft
    except ImportError as e:
        raise ImportError(f"model.lora needs peft: pip install 'fsl[hf]' ({e})") from e
    return peft


def frozen_names(module: nn.Module) -> set[str]:
    """Names of ``module``'s parameters that do not train (every alias of a tied one)."""
    return {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}


def carried_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict without its frozen parameters: the trained ones and the buffers."""
    frozen = frozen_names(module)
    return {k: v for k, v in module.state_dict().items() if k not in frozen}


def load_carried(module: nn.Module, state: Mapping[str, torch.Tensor], what: str = "segment") -> None:
    """Load ``state`` (a :func:`carried_state`, or a whole state dict) into ``module``.

    Every trained parameter and buffer must be there and nothing else; frozen parameters that
    ``state`` leaves out keep their own values. Raises ``ValueError`` naming the keys otherwise.
    """
    result = module.load_state_dict(dict(state), strict=False)
    frozen = frozen_names(module)
    missing = sorted(set(result.missing_keys) - frozen)
    if missing or result.unexpected_keys:
        raise ValueError(
            f"the {what}'s state does not fit this model: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} ({len(missing)}), unexpected {sorted(result.unexpected_keys)[:5]} "
            f"({len(result.unexpected_keys)}). Was it trained with another [model.lora] or model?"
        )


def base_digest(module: nn.Module) -> str:
    """SHA-256 over ``module``'s frozen parameters (names, dtypes, shapes, bytes); ``""`` when none is frozen.

    Two nodes with the same digest hold the same frozen base bit for bit, so the adapters one trains
    mean the same on the other."""
    frozen = frozen_names(module)
    if not frozen:
        return ""
    params = dict(module.named_parameters(remove_duplicate=False))
    h = hashlib.sha256()
    for name in sorted(frozen):
        t = params[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class BaseMismatch(ValueError):
    """A node's frozen base is not the one the adapters were trained on."""


def check_base(expected: Mapping[str, str] | None, actual: Mapping[str, str], where: str) -> None:
    """Refuse to go on when a segment's frozen base (:func:`base_digest`) is not ``expected``'s.

    ``expected`` is what the other side (the ServerApp, a checkpoint) holds; ``None`` checks nothing.
    The usual cause is another version of the pretrained weights' package or of ``transformers``.
    """
    for seg, want in (expected or {}).items():
        have = actual.get(seg)
        if have is not None and have != want:
            raise BaseMismatch(
                f"{where}: the frozen base of the {seg} segment differs from the one its adapters belong to "
                f"(expected sha256 {want[:16] or 'none'}..., this node built {have[:16] or 'none'}...). Every node must "
                "build the same base: install the same pretrained-weights package and transformers version "
                "(and the same [model] options and seed) everywhere"
            )


def original_name(name: str) -> str:
    """A parameter's name in the model without adapters (peft moves a layer's own weights to ``base_layer``)."""
    return name.replace(".base_layer.", ".")


def _matches(path: str, names: Collection[str]) -> bool:
    return any(path == n or path.endswith("." + n) for n in names)


def _under(path: str, modules: Collection[str]) -> bool:
    """Whether ``path`` (a module's or a parameter's) lies in one of the modules named by ``modules``."""
    parts = path.split(".")
    return any(_matches(".".join(parts[: i + 1]), modules) for i in range(len(parts)))


def lora_targets(
    model: nn.Module, targets: Collection[str], trainable: Collection[str] = (), within: Collection[str] | None = None
) -> list[str]:
    """The module paths that get adapters.

    ``targets`` are module names (a path or its last parts), or ``"all-linear"``; empty means peft's
    default for the model's type (``model.config.model_type``). Modules inside ``trainable`` train in
    full and get none. With ``within`` (parameter names) only modules whose weight is among them do:
    one side of a cut. Raises ``ValueError`` when nothing matches.
    """
    names = list(targets)
    if not names:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULTS:
            raise ValueError(
                f"model.lora.targets: peft has no default for {type(model).__name__} "
                f"(model type {model_type!r}); name the modules, e.g. targets = ['query', 'value'] or 'all-linear'"
            )
        names = list(DEFAULTS[model_type])
    out = []
    for path, mod in model.named_modules():
        if not path or _under(path, trainable):
            continue
        if names == ["all-linear"]:
            hit = type(mod).__name__ in _LINEAR_NAMES
        else:
            hit = _matches(path, names)
        if not hit:
            continue
        weight = getattr(mod, "weight", None)
        if within is not None and not (isinstance(weight, nn.Parameter) and f"{path}.weight" in within):
            continue
        out.append(path)
    if not out:
        where = " on that side of the cut" if within is not None else ""
        raise ValueError(f"model.lora.targets {names} match no module of {type(model).__name__}{where}")
    return out


def inject_lora(
    model: nn.Module,
    *,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    targets: Collection[str] = (),
    trainable: Collection[str] = (),
    side: Collection[str] | None = None,
    seed: int | None = None,
) -> nn.Module:
    """Put LoRA adapters of rank ``r`` into ``model`` (in place) and freeze what they adapt.

    What trains afterwards: the adapters, the parameters of the modules named in ``trainable``,
    and, when ``side`` (parameter names of the model without adapters) limits the adapters to one
    segment, every parameter outside it. With ``seed`` the adapters' initial values are
    reproducible (the global torch RNG is not disturbed). Returns ``model``.
    """
    peft = _peft()
    for t in trainable:
        if not any(_matches(p, [t]) for p, _ in model.named_modules() if p):
            raise ValueError(
                f"model.lora.trainable: {type(model).__name__} has no module {t!r} (the task head to train in full); "
                "name its head, or set trainable = [] to train adapters only"
            )
    paths = lora_targets(model, targets, trainable, side)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=paths, bias="none")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    adapters = adapter_names(model)
    for name, p in model.named_parameters(remove_duplicate=False):
        full = side is not None and original_name(name) not in side
        p.requires_grad_(name in adapters or _under(name, trainable) or full)
    return model


def adapter_names(model: nn.Module) -> set[str]:
    """Names of the adapter parameters in ``model`` (peft's LoRA layers, whatever their kind)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out: set[str] = set()
    for path, mod in model.named_modules():
        if isinstance(mod, BaseTunerLayer):
            for attr in mod.adapter_layer_names:
                for n, _ in getattr(mod, attr).named_parameters():
                    out.add(f"{path}.{attr}.{n}" if path else f"{attr}.{n}")
    return out


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weights and put the plain layers back (in place; returns ``model``).

    The merged model computes what the adapted one does (up to float rounding) with the original
    model's modules and parameter names, and without the adapters' extra matrix products."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [(path, mod) for path, mod in model.named_modules() if isinstance(mod, BaseTunerLayer)]
    for path, mod in layers:
        mod.merge(safe_merge=True)  # refuses to write non-finite weights
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, leaf, mod.get_base_layer())
    return model
