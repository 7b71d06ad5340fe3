"""Data cartography: where each training sample sits on its data map (Swayamdipta et al., 2020).

Training dynamics say how hard a sample is. After each epoch a client records, for every
sample of its local data, the probability the model gives the sample's true label
(``p_true``). Over the epochs that gives each sample

* a **confidence**: the mean of ``p_true`` over the recorded epochs,
* a **variability**: the population standard deviation of ``p_true`` over those epochs
  (``ddof=0``: the spread of what was recorded, not an estimate of a larger population),
* a **correctness**: the fraction of those epochs in which ``argmax == label``.

On the map (variability on x, confidence on y) three regions stand out: *easy*
(confident and stable), *hard* (the model keeps giving the true label little probability)
and between them the *moderate* or ambiguous samples (middling confidence, or a
confidence that keeps moving). DIMEC-DC (Bajpai and Hanawal, arXiv 2412.16616) maps these
regions onto the tiers of a mobile-edge-cloud deployment: easy samples are answered on the
device, moderate ones on the edge, hard ones in the cloud; :mod:`experiments.inference.routing`
learns to tell them apart at inference time.

A :class:`Cartography` recorder is local to one client and keyed by the sample's index in
that client's local data. Recorders save to ``.npz`` files of plain arrays (no pickle) and
to JSON-friendly dicts; :meth:`Cartography.merge` joins the recorders of several clients
whose keys are disjoint (or made disjoint by per-client offsets).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fsl.data import Inputs
from fsl.exits import FINAL, all_exit_logits
from fsl.training import TrainHooks, TrainOptions, train_local

__all__ = [
    "EASY",
    "HARD",
    "MODERATE",
    "REGIONS",
    "Cartography",
    "CartographyStats",
    "classify",
    "p_true_of",
    "plot_data_map",
    "record_epochs",
    "region_counts",
    "region_thresholds",
]

EASY, MODERATE, HARD = 0, 1, 2
REGIONS = ("easy", "moderate", "hard")  # names of the labels 0, 1, 2


def p_true_of(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Probability of the true label and correctness for logits ``(B, C)`` and labels ``(B,)``."""
    probs = torch.softmax(logits.detach().float(), dim=1)  # (B, C)
    p = probs.gather(1, y.long().view(-1, 1)).squeeze(1)  # (B,)
    return p, probs.argmax(1) == y  # (B,), (B,) bool


@dataclass(frozen=True)
class CartographyStats:
    """Per-sample training dynamics, one entry per recorded sample, sorted by index."""

    indices: np.ndarray  # (N,) int64 sample keys
    confidence: np.ndarray  # (N,) mean p_true over the recorded epochs
    variability: np.ndarray  # (N,) population std of p_true over those epochs
    correctness: np.ndarray  # (N,) fraction of epochs with argmax == label (nan: never known)
    epochs: np.ndarray  # (N,) int64 number of epochs recorded for the sample

    def __len__(self) -> int:
        return len(self.indices)

    def to_dict(self) -> dict[str, list[float] | list[int]]:
        """JSON-friendly lists (``nan`` correctness becomes ``None``)."""
        return {
            "indices": self.indices.tolist(),
            "confidence": self.confidence.tolist(),
            "variability": self.variability.tolist(),
            "correctness": [None if np.isnan(c) else float(c) for c in self.correctness],  # type: ignore[misc]
            "epochs": self.epochs.tolist(),
        }


class Cartography:
    """Records ``p_true`` (and correctness) per sample and epoch; keys are local sample indices.

    Recording the same (sample, epoch) twice keeps the later value, so a retried batch does
    not count twice. Correctness may be unknown (``correct=None``): it is stored as ``nan``
    and left out of the correctness fraction.
    """

    def __init__(self) -> None:
        self._chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    # -- recording -------------------------------------------------------------------------
    def update(
        self,
        indices: torch.Tensor,
        p_true: torch.Tensor,
        epoch: int,
        correct: torch.Tensor | None = None,
    ) -> None:
        """Record one batch: sample keys ``(B,)`` int64, their ``p_true`` ``(B,)`` at ``epoch``.

        Parameters
        ----------
        indices
            ``(B,)`` integer keys of the samples in the client's local data.
        p_true
            ``(B,)`` probability of each sample's true label, in [0, 1].
        epoch
            The epoch (or any training-progress counter) the values belong to.
        correct
            ``(B,)`` booleans ``argmax == label``; ``None`` when unknown (use
            :meth:`update_from_logits` to derive it).
        """
        idx = torch.as_tensor(indices).detach().cpu().reshape(-1).numpy().astype(np.int64)
        p = torch.as_tensor(p_true).detach().cpu().reshape(-1).numpy().astype(np.float64)
        if len(idx) != len(p):
            raise ValueError(f"{len(idx)} indices but {len(p)} p_true values")
        if np.any(np.isnan(p)) or np.any(p < 0) or np.any(p > 1):
            raise ValueError("p_true must be probabilities in [0, 1] (got values outside or nan)")
        if correct is None:
            c = np.full(len(idx), np.nan)
        else:
            c = torch.as_tensor(correct).detach().cpu().reshape(-1).numpy().astype(np.float64)
            if len(c) != len(idx):
                raise ValueError(f"{len(idx)} indices but {len(c)} correctness values")
        self._chunks.append((idx, np.full(len(idx), int(epoch), dtype=np.int64), p, c))

    def update_from_logits(self, indices: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, epoch: int) -> None:
        """Record one batch from its logits ``(B, C)`` and labels ``(B,)`` (p_true and correctness)."""
        p, correct = p_true_of(logits, y)
        self.update(indices, p, epoch, correct)

    # -- the records -----------------------------------------------------------------------
    def records(self) -> dict[str, np.ndarray]:
        """All records, one row per (sample, epoch) with the latest value kept, sorted by (index, epoch)."""
        if not self._chunks:
            empty_i = np.zeros(0, dtype=np.int64)
            return {"indices": empty_i, "epochs": empty_i.copy(), "p_true": np.zeros(0), "correct": np.zeros(0)}
        idx, ep, p, c = (np.concatenate(a) for a in zip(*self._chunks, strict=True))
        order = np.lexsort((np.arange(len(idx)), ep, idx))  # by index, epoch, then arrival
        idx, ep, p, c = idx[order], ep[order], p[order], c[order]
        last = np.ones(len(idx), dtype=bool)  # the last arrival of each (index, epoch)
        last[:-1] = (idx[1:] != idx[:-1]) | (ep[1:] != ep[:-1])
        return {"indices": idx[last], "epochs": ep[last], "p_true": p[last], "correct": c[last]}

    def __len__(self) -> int:
        """Number of distinct samples recorded."""
        return len(np.unique(self.records()["indices"]))

    def stats(self) -> CartographyStats:
        """Confidence, variability and correctness of every recorded sample."""
        r = self.records()
        keys, inv, counts = np.unique(r["indices"], return_inverse=True, return_counts=True)
        n = counts.astype(np.float64)
        mean = np.bincount(inv, weights=r["p_true"], minlength=len(keys)) / n
        var = np.bincount(inv, weights=(r["p_true"] - mean[inv]) ** 2, minlength=len(keys)) / n
        known = ~np.isnan(r["correct"])
        n_known = np.bincount(inv[known], minlength=len(keys)).astype(np.float64)
        hits = np.bincount(inv[known], weights=r["correct"][known], minlength=len(keys))
        with np.errstate(invalid="ignore", divide="ignore"):
            correctness = np.where(n_known > 0, hits / n_known, np.nan)
        return CartographyStats(keys, mean, np.sqrt(var), correctness, counts.astype(np.int64))

    # -- serialization -----------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the records to ``path`` (``.npz`` of plain arrays; loads with ``allow_pickle=False``)."""
        path = Path(path)
        np.savez(path, **self.records())
        return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")

    @classmethod
    def load(cls, path: str | Path) -> Cartography:
        """A recorder holding the records saved at ``path``."""
        with np.load(Path(path), allow_pickle=False) as f:
            return cls._from_arrays(f["indices"], f["epochs"], f["p_true"], f["correct"])

    def to_dict(self) -> dict[str, list[Any]]:
        """The records as JSON-friendly lists (unknown correctness as ``None``)."""
        r = self.records()
        return {
            "indices": r["indices"].tolist(),
            "epochs": r["epochs"].tolist(),
            "p_true": r["p_true"].tolist(),
            "correct": [None if np.isnan(c) else float(c) for c in r["correct"]],
        }

    @classmethod
    def from_dict(cls, d: dict[str, list[Any]]) -> Cartography:
        """Inverse of :meth:`to_dict`."""
        correct = np.array([np.nan if c is None else float(c) for c in d["correct"]], dtype=np.float64)
        return cls._from_arrays(np.asarray(d["indices"]), np.asarray(d["epochs"]), np.asarray(d["p_true"]), correct)

    @classmethod
    def _from_arrays(cls, idx: np.ndarray, ep: np.ndarray, p: np.ndarray, c: np.ndarray) -> Cartography:
        if not len(idx) == len(ep) == len(p) == len(c):
            raise ValueError("cartography records: indices, epochs, p_true and correct differ in length")
        out = cls()
        if len(idx):
            out._chunks.append((idx.astype(np.int64), ep.astype(np.int64), p.astype(np.float64), c.astype(np.float64)))
        return out

    @classmethod
    def merge(cls, recorders: Sequence[Cartography], offsets: Sequence[int] | None = None) -> Cartography:
        """One recorder holding the records of several clients.

        Parameters
        ----------
        recorders
            The clients' recorders.
        offsets
            Added to each recorder's keys (e.g. the start of each client's slice in a global
            index). Without offsets the keys must already be disjoint.

        Raises
        ------
        ValueError
            When two recorders (after the offsets) hold the same key: their samples would be
            mixed up. Each client keys by its *local* index, so pass offsets.
        """
        if offsets is not None and len(offsets) != len(recorders):
            raise ValueError(f"{len(recorders)} recorders but {len(offsets)} offsets")
        out = cls()
        owner: dict[int, int] = {}
        for k, rec in enumerate(recorders):
            r = rec.records()
            idx = r["indices"] + (0 if offsets is None else int(offsets[k]))
            for key in np.unique(idx).tolist():
                if owner.setdefault(key, k) != k:
                    raise ValueError(
                        f"recorders {owner[key]} and {k} both hold sample key {key}: keys must be disjoint; "
                        "clients key by local index, so pass offsets (e.g. cumulative local dataset sizes)"
                    )
            if len(idx):
                out._chunks.append((idx, r["epochs"], r["p_true"], r["correct"]))
        return out


def _head_logits(model: nn.Module, x: Inputs, head: str, batch_size: int) -> torch.Tensor:
    """Logits ``(N, C)`` of exit ``head`` (or of the final classifier) on ``x``, in eval mode."""
    logits = all_exit_logits(model, x, batch_size)
    if head not in logits:
        raise ValueError(f"model has no exit {head!r}; its exits are {sorted(k for k in logits if k != FINAL)}")
    return logits[head]


def record_epochs(
    model: nn.Module,
    x: Inputs,
    y: torch.Tensor,
    epochs: int,
    *,
    lr: float = 0.05,
    batch_size: int = 32,
    momentum: float = 0.9,
    exit_weight: float = 0.5,
    clip_norm: float = 0.0,
    seed: int = 0,
    head: str = FINAL,
    recorder: Cartography | None = None,
    indices: torch.Tensor | None = None,
    eval_batch_size: int = 1024,
    during: bool = False,
) -> Cartography:
    """Train ``model`` locally for ``epochs`` and record ``p_true`` on the training data after each epoch.

    Each epoch is one call of :func:`clients.trainer.train_local` (plain SGD over shuffled
    batches, seed ``seed + epoch``; the momentum buffer starts afresh every epoch), then the
    model, in eval mode, scores all of ``x`` with classifier ``head`` (``"final"`` or an exit
    name) and the recorder gets every sample's ``p_true`` and correctness for that epoch.

    With ``during`` the records are instead taken *while* training, as split training takes
    them: one ``train_local`` call of ``epochs`` epochs whose ``cartography`` hook passes each
    batch's ``p_true`` under the final classifier in train mode (Swayamdipta et al.'s recipe;
    correctness is then unknown and ``head`` must be ``"final"``).

    Parameters
    ----------
    model
        A (multi-exit) model, trained in place.
    x, y
        Training inputs (``(N, C, H, W)`` images, or named tensors such as token ids and an
        attention mask) and ``(N,)`` labels.
    epochs
        Number of epochs (one record per sample per epoch).
    clip_norm
        Each step's gradient norm bound (0: none).
    indices
        ``(N,)`` keys of the samples (default ``0..N-1``: the local index).
    recorder
        Records are added to this recorder (default: a new one).

    Returns
    -------
    Cartography
        The recorder.
    """
    rec = Cartography() if recorder is None else recorder
    keys = torch.arange(len(y)) if indices is None else torch.as_tensor(indices)
    if during:
        if head != FINAL:
            raise ValueError("records taken during training are the final classifier's: head must be 'final'")

        def hook(idx: torch.Tensor, p: torch.Tensor, epoch: int) -> None:
            rec.update(keys[idx], p, epoch)

        opts = TrainOptions(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            momentum=momentum,
            seed=seed,
            exit_weight=exit_weight,
            clip_norm=clip_norm,
        )
        train_local(model, x, y, opts, TrainHooks(cartography=hook))
        return rec
    for epoch in range(epochs):
        opts = TrainOptions(
            batch_size=batch_size,
            lr=lr,
            momentum=momentum,
            seed=seed + epoch,
            exit_weight=exit_weight,
            clip_norm=clip_norm,
        )
        train_local(model, x, y, opts)
        rec.update_from_logits(keys, _head_logits(model, x, head, eval_batch_size), y, epoch)
    return rec


def region_thresholds(
    stats: CartographyStats,
    *,
    hard_below: float | None = None,
    easy_above: float | None = None,
    easy_max_variability: float | None = None,
    hard_quantile: float = 0.2,
    easy_quantile: float = 0.5,
    variability_quantile: float = 0.5,
) -> dict[str, float]:
    """The thresholds :func:`classify` uses: absolute values where given, else quantiles of ``stats``.

    Returns
    -------
    dict
        ``hard_below`` (confidence), ``easy_above`` (confidence) and
        ``easy_max_variability``.
    """
    for name, q in (("hard", hard_quantile), ("easy", easy_quantile), ("variability", variability_quantile)):
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"{name}_quantile must lie in [0, 1], got {q}")
    if not len(stats):
        raise ValueError("no samples recorded: nothing to classify")
    hb = float(np.quantile(stats.confidence, hard_quantile)) if hard_below is None else float(hard_below)
    ea = float(np.quantile(stats.confidence, easy_quantile)) if easy_above is None else float(easy_above)
    ev = (
        float(np.quantile(stats.variability, variability_quantile))
        if easy_max_variability is None
        else float(easy_max_variability)
    )
    return {"hard_below": hb, "easy_above": max(ea, hb), "easy_max_variability": ev}


def classify(stats: CartographyStats, **thresholds: Any) -> np.ndarray:
    """Data-map region of each sample: 0 easy, 1 moderate, 2 hard (:data:`REGIONS`).

    * hard: confidence below ``hard_below`` (default: the ``hard_quantile`` = 0.2 quantile
      of the confidences), whatever the variability;
    * easy: confidence at least ``easy_above`` (default: the median) and variability at
      most ``easy_max_variability`` (default: the median variability);
    * moderate: everything else (middling confidence, or confident but unstable).

    Parameters
    ----------
    stats
        From :meth:`Cartography.stats`.
    **thresholds
        Keyword arguments of :func:`region_thresholds`.

    Returns
    -------
    np.ndarray
        ``(N,)`` int64 labels, aligned with ``stats.indices``.
    """
    t = region_thresholds(stats, **thresholds)
    labels = np.full(len(stats), MODERATE, dtype=np.int64)
    labels[(stats.confidence >= t["easy_above"]) & (stats.variability <= t["easy_max_variability"])] = EASY
    labels[stats.confidence < t["hard_below"]] = HARD
    return labels


def region_counts(labels: np.ndarray | torch.Tensor) -> dict[str, int]:
    """How many samples fall in each region, by name."""
    lab = np.asarray(labels)
    return {name: int((lab == k).sum()) for k, name in enumerate(REGIONS)}


def plot_data_map(
    stats: CartographyStats,
    labels: np.ndarray,
    path: str | Path,
    *,
    title: str = "Data map",
    max_points: int = 20000,
    seed: int = 0,
) -> Path:
    """The classic data map (variability on x, confidence on y), one colour per region, as a PNG.

    At most ``max_points`` samples are drawn (a seeded random subset) so the plot stays light.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lab = np.asarray(labels)
    if len(lab) != len(stats):
        raise ValueError(f"{len(lab)} labels for {len(stats)} samples")
    pick = np.arange(len(lab))
    if len(pick) > max_points:
        pick = np.sort(np.random.default_rng(seed).choice(len(lab), max_points, replace=False))
    counts = region_counts(lab)
    fig, ax = plt.subplots(figsize=(6, 5), dpi=120)
    for k, (name, colour) in enumerate(zip(REGIONS, ("tab:green", "tab:orange", "tab:red"), strict=True)):
        sel = pick[lab[pick] == k]
        ax.scatter(
            stats.variability[sel], stats.confidence[sel], s=3, alpha=0.4, c=colour, label=f"{name} ({counts[name]})"
        )
    ax.set_xlabel("variability (std of p_true over epochs)")
    ax.set_ylabel("confidence (mean p_true over epochs)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.legend(loc="lower right", markerscale=4)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
